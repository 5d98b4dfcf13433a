"""Importing a team's rows (Parquet, CSV, JSON Lines) into PostgreSQL: the mapping, categorical
encoding, bad input refused whole, erasure tombstones, and appending without touching models
trained before."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import replace

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import pipeline_steps
from worker import data, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.core import methods
from worker.config import Settings, get_settings
from worker.core.base import FeatureSchema, TrainConfig
from worker.data import mapping, sources, tombstones

pytestmark = pytest.mark.services

TABULAR = data.Mapping(sample_id="id", subject_id="person", label="y", split="split",
                       features=("age", "income", "plan"), categorical=("plan",))


def tabular(ids=range(12), **overrides) -> dict[str, list]:
    """Twelve rows: two numeric features and a categorical one; rows 0 and 6 public."""
    ids = list(ids)
    columns = {
        "id": [f"row-{i:03d}" for i in ids],
        "person": [None if i % 6 == 0 else f"person-{i // 3}" for i in ids],
        "split": ["public" if i % 6 == 0 else ("holdout" if i % 5 == 0 else "train") for i in ids],
        "y": [i % 3 for i in ids],
        "age": [20.5 + i for i in ids],
        "income": [1000 * i for i in ids],
        "plan": [("basic", "pro", "team")[i % 3] if i % 4 else "pro" for i in ids],
    }
    columns.update(overrides)
    return columns


def write(path, columns: dict[str, list]):
    """The columns as a file of the format its suffix names."""
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n"
                                for row in table.to_pylist()))
    return path


def import_file(conn, name: str, path, columns: data.Mapping = TABULAR) -> data.Imported:
    batches, _ = sources.open_file(path, columns)
    imported = data.import_rows(conn, name, batches, columns, source=str(path))
    conn.commit()
    return imported


def store_rows(conn, dataset: str) -> list[tuple]:
    rows = conn.execute("SELECT sample_id, subject_id, split, label, features, generation FROM training_samples"
                        " WHERE dataset = %s ORDER BY sample_id", (dataset,)).fetchall()
    conn.commit()
    return rows


def everything(conn) -> tuple:
    found = (conn.execute("SELECT * FROM training_samples ORDER BY sample_id").fetchall(),
             conn.execute("SELECT name, rows_loaded, generation, categories, class_names FROM datasets"
                          " ORDER BY name").fetchall())
    conn.commit()
    return found


def test_parquet_csv_and_json_lines_import_the_same_rows(conn, tmp_path):
    imported = []
    for suffix in (".parquet", ".csv", ".jsonl"):
        # When the same rows are imported from each format (the dataset emptied in between)
        path = write(tmp_path / f"team{suffix}", tabular())
        result = import_file(conn, "team", path)
        imported.append((result.rows, result.skipped_erased, result.by_split, store_rows(conn, "team"),
                         data.spec(conn, "team")))
        conn.execute("DELETE FROM training_samples WHERE dataset = 'team'")
        conn.execute("DELETE FROM datasets WHERE name = 'team'")
        conn.commit()
    # Then every format gives the same rows and the same dataset record
    assert imported[0] == imported[1] == imported[2]
    rows, skipped, by_split, stored, spec = imported[0]
    assert (rows, skipped, by_split) == (12, 0, {"public": 2, "holdout": 2, "train": 8})
    assert stored[1] == ("row-001", "person-0", "train", 1, [21.5, 1000.0, 0.0], 0)
    assert stored[0][1] is None and stored[0][2] == "public"
    assert (spec.input_shape, spec.scale, spec.num_classes, spec.generation) == ((3,), 1.0, 3, 0)
    assert spec.feature_names == ("age", "income", "plan")


def test_categorical_features_round_trip_through_their_stored_vocabulary(conn, tmp_path):
    # Given a categorical column whose vocabulary grows in order of first appearance
    import_file(conn, "team", write(tmp_path / "team.parquet", tabular()))

    # Then the vocabulary is recorded with the dataset, and each row holds its value's code
    spec = data.spec(conn, "team")
    assert spec.categories == {"plan": ("pro", "team", "basic")}
    rows = data.read_training_set(conn, "team", "train")
    assert rows.schema == FeatureSchema(("age", "income", "plan"), {"plan": ("pro", "team", "basic")})
    plans = dict(zip(tabular()["id"], tabular()["plan"]))
    decoded = [spec.categories["plan"][int(code)] for code in rows.features[:, 2]]
    assert decoded == [plans[s] for s in rows.sample_ids]
    assert FeatureSchema.from_json(json.loads(json.dumps(rows.schema.to_json()))) == rows.schema

    # And an append keeps the codes; a category the vocabulary lacks is refused by row and column
    import_file(conn, "team", write(tmp_path / "more.parquet", tabular(range(12, 15))))
    assert data.spec(conn, "team").categories == spec.categories
    unseen = tabular(range(15, 18), plan=["pro", "enterprise", "basic"])
    with pytest.raises(data.ImportRefused, match=r"new\.parquet: row 2, column 'plan': a category outside"):
        import_file(conn, "team", write(tmp_path / "new.parquet", unseen))


def test_a_declared_vocabulary_and_text_labels(conn, tmp_path):
    # Given a mapping file declaring the plan vocabulary, with text labels
    (tmp_path / "mapping.toml").write_text(
        '[columns]\nsample_id = "id"\nsubject_id = "person"\nlabel = "y"\nsplit = "split"\n'
        'features = ["age", "income", "plan"]\ncategorical = ["plan"]\n'
        '[dataset]\nclasses = ["no", "maybe", "yes"]\n[categories]\nplan = ["team", "pro", "basic"]\n')
    columns = mapping.build(tmp_path / "mapping.toml")
    labels = [("no", "maybe", "yes")[i % 3] for i in range(12)]
    import_file(conn, "team", write(tmp_path / "team.csv", tabular(y=labels)), columns)

    spec = data.spec(conn, "team")
    assert spec.class_names == ("no", "maybe", "yes") and spec.num_classes == 3
    assert spec.categories == {"plan": ("team", "pro", "basic")}
    assert [r[3] for r in store_rows(conn, "team")] == [i % 3 for i in range(12)]
    # and a label outside the classes is refused when appending
    bad = tabular(range(12, 15), y=["no", "never", "yes"])
    with pytest.raises(data.ImportRefused, match=r"row 2, column 'y': a label not among the dataset's classes"):
        import_file(conn, "team", write(tmp_path / "bad.csv", bad), columns)


ARRAY = data.Mapping(sample_id="id", subject_id="person", label="y", split="split", features=("pixels",),
                     shape=(1, 2, 2), num_classes=4)


def pixels(ids=range(8), width=4, **overrides) -> dict[str, list]:
    ids = list(ids)
    columns = {"id": [f"img-{i:03d}" for i in ids], "person": [f"p-{i // 2}" for i in ids],
               "split": ["train"] * len(ids), "y": [i % 4 for i in ids],
               "pixels": [[float(i + j) for j in range(width)] for i in ids]}
    columns.update(overrides)
    return columns


@pytest.mark.parametrize("case, columns, message", [
    ("wrong type", dict(income=["1", "2", "lots", *map(str, range(3, 12))]),
     r"row 3, column 'income': text where a number belongs"),
    ("nan", dict(age=[1.0, float("nan"), *range(10)]), r"row 2, column 'age': a NaN or infinite feature"),
    ("infinite", dict(age=[1.0, 2.0, 3.0, float("inf"), *range(8)]), r"row 4, column 'age': a NaN or infinite"),
    ("duplicate in file", dict(id=[f"row-{i:03d}" for i in (0, 1, 2, 1, *range(4, 12))]),
     r"rows 2 and 4, column 'id': the same sample id twice"),
    ("no subject", dict(person=["a", "a", None, *"bcdefghij"], split=["train"] * 12),
     r"row 3, column 'person': a train row needs a subject"),
    ("public with a subject", dict(person=["a"] * 12, split=["public", *["train"] * 11]),
     r"row 1, column 'person': a public row is never erasable"),
    ("unknown split", dict(split=["train", "test", *["train"] * 10], person=["a"] * 12),
     r"row 2, column 'split': a split other than train, holdout, public"),
    ("negative label", dict(y=[0, 1, -1, *[0] * 9]), r"row 3, column 'y': a label outside"),
])
def test_bad_rows_are_refused_by_file_row_and_column_and_nothing_is_imported(conn, tmp_path, case, columns, message):
    # Given a dataset already holding rows
    import_file(conn, "team", write(tmp_path / "first.parquet", pixels()), ARRAY)
    before = everything(conn)
    # When a file with one bad row is imported
    path = write(tmp_path / "bad.csv", tabular(range(100, 112), **columns))
    with pytest.raises(data.ImportRefused, match=rf"^{tmp_path}/bad\.csv: {message}"):
        import_file(conn, "other", path)
    # Then nothing of it is in the database
    assert everything(conn) == before


@pytest.mark.parametrize("case, columns, message", [
    ("shape", pixels(range(8, 10), width=5), r"row 1, column 'pixels': 5 features, where the dataset's rows have 4"),
    ("label", pixels(range(8, 10), y=[3, 4]), r"row 2, column 'y': a label outside the dataset's classes \(0 to 3\)"),
    ("in the store", pixels([8, 3]), r"row 2, column 'id': a sample id already in the store"),
    ("missing feature", pixels(range(8, 10), pixels=[[1.0, 2.0, 3.0, 4.0], None]), r"row 2, column 'pixels': no features"),
    ("text labels", pixels(range(8, 10), y=["a", "b"]), r"row 1, column 'y': the dataset's labels are integer"),
])
def test_an_append_that_does_not_fit_the_dataset_is_refused(conn, tmp_path, case, columns, message):
    import_file(conn, "images", write(tmp_path / "first.jsonl", pixels()), ARRAY)
    before = everything(conn)
    with pytest.raises(data.ImportRefused, match=rf"more\.jsonl: {message}"):
        import_file(conn, "images", write(tmp_path / "more.jsonl", columns), ARRAY)
    assert everything(conn) == before


def test_an_empty_file_or_another_shape_is_refused(conn, tmp_path):
    empty = write(tmp_path / "empty.parquet", {k: pa.array([], type=pa.array(v).type) for k, v in pixels().items()})
    with pytest.raises(data.ImportRefused, match=r"empty\.parquet: no rows to import"):
        import_file(conn, "images", empty, ARRAY)
    import_file(conn, "images", write(tmp_path / "first.parquet", pixels()), ARRAY)
    with pytest.raises(data.ImportRefused, match=r"more\.parquet: shape \[4\] differs from dataset images's \[1, 2, 2\]"):
        import_file(conn, "images", write(tmp_path / "more.parquet", pixels(range(8, 10))),
                    replace(ARRAY, shape=(4,)))


def test_a_missing_column_or_unknown_format_is_named(tmp_path):
    path = write(tmp_path / "team.parquet", {k: v for k, v in tabular().items() if k != "y"})
    with pytest.raises(sources.SourceError, match=r"team\.parquet: column\(s\) 'y' named by the mapping are missing"):
        sources.open_file(path, TABULAR)
    csv_path = write(tmp_path / "team.csv", {k: v for k, v in tabular().items() if k != "income"})
    with pytest.raises(sources.SourceError, match=r"team\.csv: column\(s\) 'income' .* missing"):
        sources.open_file(csv_path, TABULAR)
    with pytest.raises(sources.SourceError, match=r"team\.xlsx: unknown format"):
        sources.open_file(tmp_path / "team.xlsx", TABULAR)


def test_erased_subjects_and_samples_never_come_back_and_tombstones_hold_no_id(conn, tmp_path, artifact_dir):
    settings = get_settings()
    path = write(tmp_path / "team.parquet", tabular())
    import_file(conn, "team", path)
    # When a subject (rows 1, 2) and a sample (row 4) are erased through the pipeline's first step
    pipeline_steps.request(conn, settings, ["person-0"])
    sample_request = pipeline_steps.request(conn, settings, ["person-1"])  # rows 3, 4, 5
    assert conn.execute("SELECT rows_deleted FROM erasure_requests WHERE request_id = %s",
                        (sample_request,)).fetchone() == (3,)
    conn.commit()

    # Then the tombstones hold keyed hashes, not the ids
    stones = conn.execute("SELECT kind, digest FROM erasure_tombstones").fetchall()
    conn.commit()
    assert sorted(k for k, _ in stones) == ["sample"] * 5 + ["subject"] * 2
    key = tombstones.load_key(settings)
    assert {bytes(d) for k, d in stones if k == "subject"} == set(tombstones.digests(key, "subject",
                                                                                 ["person-0", "person-1"]))
    for _, digest in stones:
        assert b"person" not in bytes(digest) and b"row-" not in bytes(digest) and len(digest) == 32

    # And importing the same file again (into an emptied dataset) leaves their rows out, counted
    conn.execute("DELETE FROM training_samples WHERE dataset = 'team'")
    conn.execute("DELETE FROM datasets WHERE name = 'team'")
    conn.commit()
    again = import_file(conn, "team", path)
    assert (again.rows, again.skipped_erased) == (7, 5)
    assert {r[0] for r in store_rows(conn, "team")}.isdisjoint({f"row-{i:03d}" for i in range(1, 6)})
    # and a row of an erased subject under a new sample id does not come back either
    later = import_file(conn, "team", write(tmp_path / "later.csv", tabular(range(50, 52),
                                                                            person=["person-0", "person-9"])))
    assert (later.rows, later.skipped_erased) == (1, 1)


def test_the_tombstone_key_is_created_once_private_and_shared(tmp_path):
    settings = Settings(stack_dir=tmp_path / "stack")
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(tombstones.load_key(settings))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    path = tmp_path / "stack" / "tombstone.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["tombstone.key"]
    with pytest.raises(FileNotFoundError, match="UNLEARN_TOMBSTONE_KEY_FILE"):
        tombstones.load_key(Settings(tombstone_key_file=tmp_path / "absent.key"))


def digits_file(path, rows: list[tuple], prefix: str):
    """Built-in digits rows written as a team's Parquet file, ids renamed."""
    return write(path, {"id": [f"{prefix}-{r[0]}" for r in rows], "person": [r[1] and f"{prefix}-{r[1]}" for r in rows],
                        "split": [r[3] for r in rows], "y": [r[4] for r in rows], "pixels": [r[5] for r in rows]})


def test_rows_appended_after_training_stay_out_of_the_model_and_unlearning_is_still_exact(conn, tmp_path, ctx):
    # Given 600 digits rows imported, a SISA model trained on them, then 300 more rows appended
    settings = get_settings()
    rows = data.prepare_rows("digits")
    columns = data.Mapping(sample_id="id", subject_id="person", label="y", split="split", features=("pixels",),
                           shape=(1, 8, 8), scale=16.0, num_classes=10)
    import_file(conn, "team", digits_file(tmp_path / "a.parquet", rows[:600], "a"), columns)
    config = TrainConfig(network="mlp", hidden=(16,), epochs=2, batch_size=32, seed=3, shards=3, slices=2)
    registry.train_model(conn, settings, "team-sisa", "sisa", "team", config)
    appended = import_file(conn, "team", digits_file(tmp_path / "b.parquet", rows[600:900], "b"), columns)
    assert appended.generation == 1 and data.spec(conn, "team").generation == 1
    conn.commit()

    # When a subject of the first rows is erased and the model unlearns it
    subject = conn.execute("SELECT subject_id FROM training_samples WHERE dataset = 'team' AND split = 'train'"
                           " AND generation = 0 ORDER BY subject_id LIMIT 1").fetchone()[0]
    conn.commit()
    pipeline_steps.request(conn, settings, [subject])
    outcome = pipeline_steps.run_passes(ctx, "team-sisa")
    assert outcome.version == 2

    # Then version 2 equals training from scratch on the first import's rows less the erased ones
    remaining = data.read_training_set(conn, "team", "train", generation=0)
    public = data.read_training_set(conn, "team", "public", generation=0)
    conn.commit()
    assert not any(s.startswith("b-") for s in remaining.sample_ids)
    scratch = methods.method_for("sisa")().train(remaining, config, ArtifactStore(tmp_path / "scratch", "x"),
                                                 public=public)
    current = registry.current_version(conn, "team-sisa")
    manifest = read_manifest(settings.artifact_dir, "team-sisa", 2, current.manifest_sha256)
    assert [c["sha256"] for c in manifest["components"]] == [c.sha256 for c in scratch.components]
    assert manifest["input"]["feature_names"][:2] == ["pixels[0]", "pixels[1]"]
    assert manifest["input"]["shape"] == [1, 8, 8] and manifest["input"]["categories"] == {}
    placed = conn.execute("SELECT count(*) FROM sample_placement WHERE model = 'team-sisa' AND sample_id LIKE 'b-%'")
    assert placed.fetchone() == (0,)
    # And a model trained now takes the appended rows too
    registry.train_model(conn, settings, "team-later", "sisa", "team", config)
    assert conn.execute("SELECT data_generation FROM models WHERE name = 'team-later'").fetchone() == (1,)


def test_cli_imports_with_a_mapping_file_and_reports_errors(database_url, tmp_path):
    (tmp_path / "mapping.toml").write_text(
        '[columns]\nsample_id = "id"\nsubject_id = "person"\nlabel = "y"\nsplit = "split"\nfeatures = "pixels"\n'
        '[dataset]\nshape = [1, 2, 2]\nnum_classes = 4\n')
    path = write(tmp_path / "images.parquet", pixels())
    runner = CliRunner()
    done = runner.invoke(main, ["data", "import", str(path), "--dataset", "images", "--mapping",
                                str(tmp_path / "mapping.toml")])
    assert done.exit_code == 0, done.output
    assert "imported 8 rows into images (generation 0: train 8); 0 rows of erased subjects or samples left out" \
        in done.output
    again = runner.invoke(main, ["data", "import", str(path), "--dataset", "images", "--mapping",
                                 str(tmp_path / "mapping.toml")])
    assert again.exit_code == 1 and "row 1, column 'id': a sample id already in the store" in again.output
    flags = runner.invoke(main, ["data", "import", str(write(tmp_path / "t.csv", tabular())), "--dataset", "team",
                                 "--sample-id", "id", "--subject-id", "person", "--label", "y", "--split", "split",
                                 "--features", "age", "--features", "income", "--features", "plan",
                                 "--categorical", "plan"])
    assert flags.exit_code == 0 and "imported 12 rows into team" in flags.output, flags.output
    missing = runner.invoke(main, ["data", "import", str(tmp_path / "nope.csv"), "--dataset", "x"])
    assert missing.exit_code == 2 and "nope.csv: no such file" in missing.output


def test_an_erasure_during_an_import_waits_for_it_and_then_finds_its_rows(conn, database_url, tmp_path, artifact_dir):
    # Given an import that has written rows of person-0 and is still running
    settings = get_settings()
    table = pa.Table.from_pydict(tabular(range(1, 3)))
    written, release = threading.Event(), threading.Event()

    def batches():
        yield table.to_batches()[0]
        written.set()
        release.wait(30)

    def run_import():
        with psycopg.connect(database_url) as importer_conn:
            data.import_rows(importer_conn, "team", batches, TABULAR, source="held.parquet")

    importing = threading.Thread(target=run_import)
    with psycopg.connect(database_url) as other:
        done = []
        importing.start()
        assert written.wait(30)
        # When person-0's erasure starts meanwhile
        erasing = threading.Thread(target=lambda: done.append(pipeline_steps.request(other, settings, ["person-0"])))
        erasing.start()
        erasing.join(1.0)
        # Then it waits for the import, and once the import committed it deletes the imported rows
        assert erasing.is_alive() and not done
        release.set()
        importing.join(30)
        erasing.join(30)
        assert done and not erasing.is_alive()
    assert store_rows(conn, "team") == []


def test_a_mapping_file_is_checked_and_flags_override_it(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text('[columns]\nsample_id = "id"\nfeatures = "embedding"\n[dataset]\nshape = [2, 2]\n')
    built = mapping.build(path, label="target", features=())
    assert (built.sample_id, built.label, built.features, built.shape) == ("id", "target", ("embedding",), (2, 2))
    for text, message in (('[colums]\nlabel = "y"\n', r"unknown table\(s\) colums"),
                          ('[columns]\nlabels = "y"\n', r"unknown key\(s\) in \[columns\]: labels"),
                          ('[columns]\nfeatures = ["a"]\ncategorical = ["b"]\n', r"categorical column\(s\) b are not"),
                          ('[columns]\nfeatures = ["a"]\ncategorical = ["a"]\n[dataset]\nscale = 2.0\n',
                           "with categorical columns it must be 1"),
                          ("[columns\n", r"mapping .*mapping\.toml")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            mapping.build(path)


def test_train_takes_any_dataset_in_the_database_and_names_them_when_one_is_unknown(database_url, conn, tmp_path):
    import_file(conn, "images", write(tmp_path / "images.parquet", pixels()), ARRAY)
    refused = CliRunner().invoke(main, ["train", "--model", "m", "--method", "sisa", "--dataset", "nope"])
    assert refused.exit_code == 1
    assert "unknown dataset 'nope'; the database holds: images" in refused.output


def test_without_a_split_column_a_row_of_someone_is_never_public(conn, tmp_path):
    """A derived split makes rows without a subject public, and rows of a data subject holdout or
    train by the hash of their id: a person's row made public could never be erased."""
    columns = data.Mapping(sample_id="id", subject_id="person", label="y", features=("age", "income", "plan"),
                           categorical=("plan",))
    rows = tabular(ids=range(200), person=[None if i % 10 == 0 else f"person-{i}" for i in range(200)])
    del rows["split"]
    imported = import_file(conn, "team", write(tmp_path / "team.parquet", rows), columns)
    assert imported.rows == 200 and imported.by_split["public"] == 20
    assert 20 <= imported.by_split["holdout"] <= 60 and imported.by_split["train"] > 110
    owned_public = conn.execute("SELECT count(*) FROM training_samples WHERE dataset = 'team'"
                                " AND split = 'public' AND subject_id IS NOT NULL").fetchone()[0]
    assert owned_public == 0
    hash_public = [i for i in range(200) if i % 10 and data.split_of(f"row-{i:03d}") == "public"]
    assert hash_public and all(s == "train" for (s,) in conn.execute(
        "SELECT split FROM training_samples WHERE sample_id = ANY(%s)", ([f"row-{i:03d}" for i in hash_public],)))
