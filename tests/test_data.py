"""Loading real offline datasets into PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from worker import data


def test_splits_are_fixed_and_public_rows_have_no_subject():
    rows = data.prepare_rows("digits")
    assert len(rows) == 1797
    again = data.prepare_rows("digits")
    assert [r[:4] for r in rows] == [r[:4] for r in again]
    for sample_id, subject, _, split, _, _ in rows:
        assert (subject is None) == (split == "public")
    splits = {r[3] for r in rows}
    assert splits == {"train", "holdout", "public"}


def test_every_subject_owns_several_rows():
    rows = data.prepare_rows("digits")
    counts: dict[str, int] = {}
    for _, subject, *_ in rows:
        if subject is not None:
            counts[subject] = counts.get(subject, 0) + 1
    assert min(counts.values()) >= 1
    assert np.mean(list(counts.values())) > 4


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits"):
        data.spec("cifar")


@pytest.mark.services
def test_load_letter_with_copy_once(conn):
    # When letter is loaded
    loaded = data.load_into_postgres(conn, "letter")
    # Then all 20,000 rows are in Postgres, split and owned
    assert loaded.rows == 20000 and not loaded.already_loaded
    assert set(loaded.by_split) == {"train", "holdout", "public"}
    assert loaded.subjects > 3000
    # And a second load changes nothing (erased rows must never come back)
    conn.execute("DELETE FROM training_samples WHERE sample_id = 'letter-000000'")
    conn.commit()
    again = data.load_into_postgres(conn, "letter")
    assert again.already_loaded and again.rows == 19999

    train = data.read_training_set(conn, "letter", "train")
    assert train.features.shape == (again.by_split["train"], 16)
    assert float(train.features.max()) <= 1.0
    assert train.num_classes == 26
