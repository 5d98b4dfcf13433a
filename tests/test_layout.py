"""The house's seams that an import shows: the benchmarks of the core need only the core (no
PostgreSQL, Kafka, Celery or Redis client), the service never imports the development tools
of `worker.devstack`, and the command line runs as a module where no script is installed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_CLIENTS = ("psycopg", "kafka", "celery", "redis")
CORE_BENCHMARKS = ("worker.bench", "worker.bench.base", "worker.bench.rows", "worker.bench.sisa",
                   "worker.bench.frontier", "worker.bench.amnesiac", "worker.bench.s3t", "worker.bench.budget",
                   "worker.bench.arcane", "worker.bench.puma", "worker.bench.memorising", "worker.bench.gpu")
# what runs in production: none of it may import the development tools
SERVICE_MODULES = ("worker/pipeline", "worker/core", "worker/data", "worker/db", "worker/registry", "worker/serving",
                   "worker/artifacts.py", "worker/events.py", "worker/kafka_clients.py", "worker/failpoints.py")


def test_the_core_benchmarks_import_without_any_service_client(tmp_path):
    # Given a Python where importing psycopg, kafka, celery or redis fails
    script = (f"import importlib, sys\nfor name in {SERVICE_CLIENTS!r}:\n    sys.modules[name] = None\n"
              f"for module in {CORE_BENCHMARKS!r}:\n    importlib.import_module(module)\n")
    # When every benchmark of the core is imported there
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    # Then each imports
    assert done.returncode == 0, done.stderr


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_no_service_module_imports_the_development_tools():
    files = [path for entry in SERVICE_MODULES for path in
             ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir() else [ROOT / entry])]
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in _imported(path)
                                                      if name.startswith("worker.devstack"))
                 for path in files}
    assert files and not {path: names for path, names in offenders.items() if names}


def test_the_command_line_runs_as_a_module_where_no_script_is_installed(tmp_path):
    # Given a Python with the project on its path but no `unlearn` script (a bare GPU machine)
    # When the command line is run as a module
    done = subprocess.run([sys.executable, "-m", "worker.cli", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    # Then it answers as `unlearn` does, with every verb
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: unlearn ")
    assert all(f"  {verb} " in done.stdout for verb in ("intake", "worker", "serve", "bench", "stack", "demo"))
