"""Version 1 is an event like every other version: `unlearn train` queues its `model.versions`
event in the outbox with it, so a model server started before training serves it (found: every
model's topic started at v2 and a server started first answered 503 until the first erasure)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from rich.console import Console

from worker import data, events
from worker.config import get_settings
from worker.devstack.demo import running, server_process, wait_for_version
from worker.devstack.sandbox import free_port, isolated
from worker.pipeline.watch import TopicWatcher

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_a_server_started_before_training_serves_version_one(tmp_path):
    with isolated(get_settings(), tmp_path, 11, "v1") as settings:
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, "digits")
        port = free_port()
        # Given a model server started first, for a model not trained yet
        with running(settings, Console(quiet=True), (server_process("digits-sisa", port),)):
            listener = TopicWatcher(settings)
            try:
                # When the model is trained with the CLI (no intake running)
                done = subprocess.run(
                    [str(Path(sys.executable).with_name("unlearn")), "train", "--model", "digits-sisa", "--method",
                     "sisa", "--dataset", "digits", "--shards", "2", "--epochs", "1", "--hidden", "16"],
                    capture_output=True, text=True, timeout=300, env=os.environ.copy())
                assert done.returncode == 0, done.stdout + done.stderr
                # Then version 1 was published on model.versions, signed, with no parent
                shown = wait_for_version(f"http://127.0.0.1:{port}", 1)
                assert shown["version"] == 1
                listener.pump()
                [first] = [v for v in listener.versions() if v.data["model"] == "digits-sisa"]
                assert first.data["version"] == 1 and first.data["parent_version"] is None
                assert first.data["revokes"] == [] and first.type == events.MODEL_VERSION_PUBLISHED
            finally:
                listener.close()
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0] == 0
