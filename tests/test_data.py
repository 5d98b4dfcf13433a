"""Loading real offline datasets, and the generated `synthetic` one, into PostgreSQL."""

from __future__ import annotations

import re
import uuid
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from worker import data, db
from worker.cli import main
from worker.config import get_settings


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


def test_unknown_builtin_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits"):
        data.builtin_spec("cifar")


@pytest.mark.services
def test_unknown_dataset_names_the_ones_the_database_holds(conn):
    with pytest.raises(data.UnknownDataset, match="unknown dataset 'cifar'; the database holds: none yet"):
        data.spec(conn, "cifar")
    data.load_into_postgres(conn, "digits")
    with pytest.raises(data.UnknownDataset, match="unknown dataset 'cifar'; the database holds: digits$"):
        data.spec(conn, "cifar")
    digits = data.spec(conn, "digits")
    assert (digits.input_shape, digits.scale, digits.num_classes, digits.builtin) == ((1, 8, 8), 16.0, 10, True)
    assert digits.feature_names[:2] == ("features[0]", "features[1]") and len(digits.feature_names) == 64


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


def test_synthetic_rows_are_seeded_and_a_smaller_load_is_a_prefix_of_a_larger_one():
    # Given synthetic rows of two sizes, the larger one past the first generation block (65,536 rows)
    small = data.prepare_rows("synthetic", 1_000)
    large = data.prepare_rows("synthetic", 70_000)

    # Then the same row number is the same row in both, and generating again repeats it
    assert len(small) == 1_000 and len(large) == 70_000
    assert large[:1_000] == small
    assert data.prepare_rows("synthetic", 70_000)[65_530:65_540] == large[65_530:65_540]
    assert [r[0] for r in small[:2]] == ["synthetic-0000000", "synthetic-0000001"]
    assert len({r[0] for r in large}) == 70_000


def test_synthetic_subjects_own_five_rows_and_public_rows_none():
    rows = data.prepare_rows("synthetic", 20_000)
    counts: dict[str, int] = {}
    for sample_id, subject, dataset, split, label, features in rows:
        assert dataset == "synthetic" and split == data.split_of(sample_id)
        assert (subject is None) == (split == "public")
        assert 0 <= label < 8 and len(features) == 16
        if subject is not None:
            counts[subject] = counts.get(subject, 0) + 1
    # every subject owns five rows, the last one perhaps fewer
    assert sorted(counts.values())[1:] == [5] * (len(counts) - 1)
    shares = {split: sum(r[3] == split for r in rows) / len(rows) for split in ("public", "holdout", "train")}
    assert abs(shares["public"] - 0.1) < 0.01 and abs(shares["holdout"] - 0.2) < 0.015


def test_synthetic_rows_are_learnable():
    # Given the training rows, a nearest-class-mean classifier fitted on them
    rows = data.prepare_rows("synthetic", 10_000)
    features = np.array([r[5] for r in rows], dtype=np.float64)
    labels = np.array([r[4] for r in rows])
    train, holdout = (np.array([r[3] == split for r in rows]) for split in ("train", "holdout"))
    means = np.stack([features[train & (labels == c)].mean(axis=0) for c in range(8)])
    predicted = ((features[holdout, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    # Then it beats chance (1/8) by far on the holdout rows
    assert np.mean(predicted == labels[holdout]) > 0.5


@pytest.mark.parametrize("name, rows, message", [
    ("synthetic", None, "say how many rows"),
    ("synthetic", 0, "from 1 to 10,000,000, not 0"),
    ("synthetic", -5, "not -5"),
    ("synthetic", 10_000_001, "not 10000001"),
    ("synthetic", True, "not True"),
    ("digits", 100, "digits is a real dataset of fixed size; --rows applies to synthetic only"),
])
def test_bad_synthetic_sizes_are_clear_errors(name, rows, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data.prepare_rows(name, rows)


@pytest.fixture
def other_conn(database_url):
    """A second fresh database beside `conn`'s."""
    base = get_settings().database_url
    name = f"unlearn_test_{uuid.uuid4().hex[:12]}"
    url = urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    db.ensure_database(url)
    db.migrate(url)
    with psycopg.connect(url) as connection:
        yield connection
    with psycopg.connect(urlunsplit(urlsplit(base)._replace(path="/postgres")), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.services
def test_synthetic_loads_the_same_rows_into_two_databases_once(conn, other_conn):
    # When synthetic is loaded with 3,000 rows into two databases
    first = data.load_into_postgres(conn, "synthetic", rows=3_000)
    second = data.load_into_postgres(other_conn, "synthetic", rows=3_000)

    # Then both hold the same rows: ids, subjects, splits, labels and features
    assert first.rows == second.rows == 3_000 and not first.already_loaded
    assert first.subjects == -(-(3_000 - first.by_split["public"]) // 5)
    everything = "SELECT sample_id, subject_id, split, label, features FROM training_samples ORDER BY sample_id"
    assert conn.execute(everything).fetchall() == other_conn.execute(everything).fetchall()
    assert data.read_training_set(conn, "synthetic", "train").features.shape == (first.by_split["train"], 16)

    # And a second load of the same size changes nothing; another size is refused by name
    conn.execute("DELETE FROM training_samples WHERE subject_id = 'synthetic-subject-0000000'")
    conn.commit()
    again = data.load_into_postgres(conn, "synthetic", rows=3_000)
    assert again.already_loaded and again.rows == 3_000 - 5
    with pytest.raises(ValueError, match="synthetic was loaded with 3,000 rows.*not again with 4,000"):
        data.load_into_postgres(conn, "synthetic", rows=4_000)


@pytest.mark.services
def test_cli_loads_synthetic_and_refuses_bad_sizes(database_url):
    runner = CliRunner()
    loaded = runner.invoke(main, ["data", "load", "synthetic", "--rows", "500"])
    assert loaded.exit_code == 0, loaded.output
    assert "loaded 500 synthetic rows" in loaded.output
    for args, message in ((["synthetic"], "say how many rows"), (["synthetic", "--rows", "0"], "not 0"),
                          (["digits", "--rows", "10"], "--rows applies to synthetic only")):
        refused = runner.invoke(main, ["data", "load", *args])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    other_size = runner.invoke(main, ["data", "load", "synthetic", "--rows", "600"])
    assert other_size.exit_code == 1 and "loaded with 500 rows" in other_size.output
