"""Methods are found, not listed: every module of worker/core/methods that defines a method class
is one, and the CLI and the version event's schema agree with what is found. No services needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.core import methods
from worker.cli import main

SCHEMA = Path(__file__).parent.parent / "schemas" / "ml.model.version.published.v1.json"


def test_the_five_methods_are_found_in_worker_core():
    assert methods.method_names() == ["amnesiac", "arcane", "puma", "s3t", "sisa"]
    for name in methods.method_names():
        assert methods.method_for(name).name == name


def test_a_new_module_is_all_a_new_method_needs(tmp_path, monkeypatch):
    # Given a module in worker/core/methods's search path that defines a class named after it
    (tmp_path / "toy.py").write_text(
        "class Toy:\n"
        "    name = 'toy'\n"
        "    def train(self, *a): ...\n    def plan(self, *a): ...\n    def apply(self, *a): ...\n"
        "    def budget(self, *a): ...\n    def predictor(self, *a): ...\n")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "worker.core.methods.toy", raising=False)
    try:
        # Then the registry offers it and builds it, with nothing registered anywhere
        assert "toy" in methods.method_names()
        assert methods.method_for("toy")().name == "toy"
    finally:
        methods._method_class.cache_clear()
        sys.modules.pop("worker.core.methods.toy", None)


def test_a_module_without_a_method_or_an_unknown_name_is_refused_with_the_choices():
    for name in ("placement", "base", "nope", "../cli"):
        with pytest.raises(ValueError, match=r"method must be one of amnesiac, arcane, puma, s3t, sisa"):
            methods.method_for(name)


def test_the_cli_offers_what_the_registry_finds():
    shown = CliRunner().invoke(main, ["train", "--help"])
    assert shown.exit_code == 0 and "[amnesiac|arcane|puma|s3t|sisa]" in shown.output
    refused = CliRunner().invoke(main, ["train", "--model", "m", "--method", "nope"])
    assert refused.exit_code == 2 and "'nope' is not one of 'amnesiac', 'arcane', 'puma', 's3t', 'sisa'" in refused.output


def test_the_version_events_schema_names_every_method():
    schema = json.loads(SCHEMA.read_text())
    assert sorted(schema["properties"]["method"]["enum"]) == methods.method_names()


def test_serving_finds_methods_without_the_database_driver():
    # downstream serving has the artifact store and nothing else: no psycopg to import
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['psycopg'] = None\n"
                           "import worker.serving.loading, worker.serving.served, worker.serving.server\n"
                           "import worker.core.methods as d; print(d.method_names())"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'sisa'" in done.stdout
