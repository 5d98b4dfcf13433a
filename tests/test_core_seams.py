"""The core does maths, not I/O: no module in `worker/core/` imports an adapter or a client of a
service (the methods write through the `TensorStore` protocol and never see SQL)."""

from __future__ import annotations

import ast
from pathlib import Path

import worker.core

FORBIDDEN = ("worker.artifacts", "worker.pipeline", "worker.registry", "worker.db", "worker.data", "psycopg",
             "kafka", "celery", "redis", "s3fs", "fsspec", "boto3")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_core_module_imports_an_adapter_or_a_service_client():
    offenders = {}
    for path in sorted(Path(worker.core.__file__).parent.glob("*.py")):
        bad = sorted(name for name in _imports(path)
                     if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
        if bad:
            offenders[path.name] = bad
    assert not offenders, offenders
