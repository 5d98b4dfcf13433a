"""Registering rows that already live in a table of the same PostgreSQL: checked like an import,
trained on in place, and erased there."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import pipeline_steps
from worker import data, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.core import methods
from worker.config import get_settings
from worker.core.base import TrainConfig
from worker.data import register
from worker.data.mapping import Mapping

pytestmark = pytest.mark.services

COLUMNS = Mapping(sample_id="id", subject_id="owner", label="digit", split="part", features=("pixels",),
                  shape=(1, 8, 8), scale=16.0, num_classes=10)


@pytest.fixture
def team_table(conn):
    """The first 400 digits rows in a table of the team's own, in a schema of its own."""
    conn.execute("CREATE SCHEMA team")
    conn.execute("CREATE TABLE team.images (id text PRIMARY KEY, owner text, part text, digit bigint,"
                 " pixels double precision[])")
    rows = data.prepare_rows("digits")[:400]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO team.images VALUES (%s, %s, %s, %s, %s)",
                        [(f"t-{r[0]}", r[1] and f"t-{r[1]}", r[3], r[4], r[5]) for r in rows])
    conn.commit()
    return rows


def table_rows(conn) -> int:
    count = conn.execute("SELECT count(*) FROM team.images").fetchone()[0]
    conn.commit()
    return count


def test_a_registered_table_is_trained_on_in_place_and_erasures_delete_there(conn, team_table, artifact_dir, ctx):
    settings = get_settings()
    # Given the table registered as a dataset
    registered = register.register_table(conn, "team", "team.images", COLUMNS)
    assert registered.rows == 400 and registered.deleted_erased == 0
    spec = data.spec(conn, "team")
    assert (spec.input_shape, spec.scale, spec.num_classes, spec.table) == ((1, 8, 8), 16.0, 10, ("team", "images"))
    train = data.read_training_set(conn, "team", "train")
    assert train.features.shape[1:] == (1, 8, 8) and float(train.features.max()) <= 1.0
    assert len(train) == sum(r[3] == "train" for r in team_table)

    # When a model trains on it and one of the table's subjects is erased
    config = TrainConfig(network="mlp", hidden=(16,), epochs=1, batch_size=32, seed=1, shards=2, slices=2)
    registry.train_model(conn, settings, "team-sisa", "sisa", "team", config)
    subject = conn.execute("SELECT owner FROM team.images WHERE part = 'train' ORDER BY owner LIMIT 1").fetchone()[0]
    owned = conn.execute("SELECT count(*) FROM team.images WHERE owner = %s", (subject,)).fetchone()[0]
    conn.commit()
    request = pipeline_steps.request(conn, settings, [subject])

    # Then its rows are deleted from the team's table, tombstoned, and the model unlearns them
    assert table_rows(conn) == 400 - owned
    assert conn.execute("SELECT rows_deleted FROM erasure_requests WHERE request_id = %s",
                        (request,)).fetchone() == (owned,)
    conn.commit()
    assert pipeline_steps.run_passes(ctx, "team-sisa").version == 2
    placed = conn.execute("SELECT count(*) FROM sample_placement p JOIN team.images t ON t.id = p.sample_id"
                          " WHERE p.model = 'team-sisa'").fetchone()[0]
    assert placed == conn.execute("SELECT count(*) FROM sample_placement WHERE model = 'team-sisa'").fetchone()[0]
    conn.commit()

    # And an erased row put back into a table is deleted when that table is registered again
    conn.execute("CREATE TABLE team.copy AS SELECT * FROM team.images")
    conn.execute("INSERT INTO team.copy VALUES ('t-back', %s, 'train', 1, %s)", (subject, [0.0] * 64))
    conn.commit()
    again = register.register_table(conn, "team-copy", "team.copy", COLUMNS)
    assert again.deleted_erased == 1 and again.rows == 400 - owned


@pytest.mark.parametrize("change, message", [
    ("UPDATE team.images SET part = 'test' WHERE id = 't-digits-000003'", r"column 'part': 1 rows with a split other"),
    ("UPDATE team.images SET owner = NULL WHERE id IN (SELECT id FROM team.images WHERE part = 'train' LIMIT 2)",
     r"column 'owner': 2 non-public rows without a subject"),
    ("UPDATE team.images SET pixels[3] = 'NaN' WHERE id = 't-digits-000005'",
     r"column 'pixels': 1 rows with a missing, NaN or infinite feature"),
    ("UPDATE team.images SET pixels = pixels[1:10] WHERE id = 't-digits-000005'", r"column 'pixels': rows of 10, 64"),
    ("UPDATE team.images SET digit = 12 WHERE id = 't-digits-000005'", r"column 'digit': labels up to 12 do not fit"),
    ("ALTER TABLE team.images DROP COLUMN part", r"column\(s\) 'part' named by the mapping are missing"),
    ("ALTER TABLE team.images ALTER COLUMN digit TYPE text", r"column 'digit': labels must be integers, not text"),
])
def test_a_table_that_breaks_the_rules_is_refused_and_nothing_is_registered(conn, team_table, change, message):
    conn.execute(change)
    conn.commit()
    with pytest.raises(register.RegisterRefused, match=rf"^table team\.images.*{message}"):
        register.register_table(conn, "team", "team.images", COLUMNS)
    assert data.names(conn) == [] and table_rows(conn) == 400


def test_a_duplicate_id_and_an_unknown_table_are_refused(conn):
    conn.execute("CREATE VIEW twice AS SELECT 'a' AS id, 's' AS owner, 'train' AS part, 1 AS digit,"
                 " ARRAY[1.0, 2.0] AS pixels UNION ALL SELECT 'a', 't', 'train', 0, ARRAY[3.0, 4.0]")
    conn.commit()
    flat = Mapping(sample_id="id", subject_id="owner", label="digit", split="part", features=("pixels",))
    with pytest.raises(register.RegisterRefused, match=r"table public\.twice, column 'id': 1 sample ids held by more"):
        register.register_table(conn, "twice", "twice", flat)
    with pytest.raises(register.RegisterRefused, match=r"table public\.nowhere: no such table or view"):
        register.register_table(conn, "x", "nowhere", flat)


def test_cli_registers_a_table_and_refuses_importing_into_it(database_url, conn, team_table, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["data", "register", "--dataset", "team", "--table", "team.images", "--sample-id", "id",
                                "--subject-id", "owner", "--label", "digit", "--split", "part", "--features", "pixels",
                                "--shape", "1,8,8", "--scale", "16"])
    assert done.exit_code == 0, done.output
    assert "registered team: 400 rows of team.images" in done.output
    again = runner.invoke(main, ["data", "register", "--dataset", "team", "--table", "team.images", "--split", "part"])
    assert again.exit_code == 1 and "dataset team exists already" in again.output
    rows = np.zeros((1, 64)).tolist()
    pq.write_table(pa.table({"sample_id": ["n"], "subject_id": ["s"], "label": [1], "features": rows}),
                   tmp_path / "more.parquet")
    refused = runner.invoke(main, ["data", "import", str(tmp_path / "more.parquet"), "--dataset", "team"])
    assert refused.exit_code == 1 and "dataset team is registered: its rows live in team.images" in refused.output


def test_rows_added_to_a_registered_table_in_a_later_batch_stay_out_of_a_model_trained_before(
        conn, team_table, artifact_dir, ctx, tmp_path):
    settings = get_settings()
    # Given the table with a batch column, registered, and a model trained on batch 0
    conn.execute("ALTER TABLE team.images ADD COLUMN batch integer NOT NULL DEFAULT 0")
    conn.commit()
    columns = Mapping(**{**COLUMNS.__dict__, "generation": "batch"})
    register.register_table(conn, "team", "team.images", columns)
    config = TrainConfig(network="mlp", hidden=(16,), epochs=1, batch_size=32, seed=2, shards=2, slices=2)
    registry.train_model(conn, settings, "team-sisa", "sisa", "team", config)

    # When the team adds rows as batch 1 and a subject of batch 0 is erased
    more = data.prepare_rows("digits")[400:500]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO team.images VALUES (%s, %s, %s, %s, %s, 1)",
                        [(f"t-{r[0]}", r[1] and f"t-{r[1]}", r[3], r[4], r[5]) for r in more])
    conn.commit()
    assert data.spec(conn, "team").generation == 1
    subject = conn.execute("SELECT owner FROM team.images WHERE part = 'train' AND batch = 0"
                           " ORDER BY owner LIMIT 1").fetchone()[0]
    conn.commit()
    pipeline_steps.request(conn, settings, [subject])
    assert pipeline_steps.run_passes(ctx, "team-sisa").version == 2

    # Then the unlearned model equals training from scratch on batch 0 less the erased rows
    remaining = data.read_training_set(conn, "team", "train", generation=0)
    public = data.read_training_set(conn, "team", "public", generation=0)
    conn.commit()
    scratch = methods.method_for("sisa")().train(remaining, config, ArtifactStore(tmp_path / "s", "x"), public=public)
    current = registry.current_version(conn, "team-sisa")
    manifest = read_manifest(settings.artifact_dir, "team-sisa", 2, current.manifest_sha256)
    assert [c["sha256"] for c in manifest["components"]] == [c.sha256 for c in scratch.components]
