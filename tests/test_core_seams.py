"""The core does maths, not I/O: no module in `worker/core/` (its methods included) imports an
adapter or a client of a service (the methods write through the `TensorStore` protocol and never
see SQL). And the methods stand side by side: no method module imports another method, and no
component of the core imports a method (what several methods share is a component)."""

from __future__ import annotations

import ast
from pathlib import Path

import worker.core
import worker.core.methods

CORE = Path(worker.core.__file__).parent
METHODS = Path(worker.core.methods.__file__).parent
FORBIDDEN = ("worker.artifacts", "worker.pipeline", "worker.registry", "worker.db", "worker.data", "psycopg",
             "kafka", "celery", "redis", "s3fs", "fsspec", "boto3")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, and every name it imports from one, spelled absolutely."""
    package = [*worker.core.__name__.split("."), *path.parent.relative_to(CORE).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_core_module_imports_an_adapter_or_a_service_client():
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        bad = sorted(name for name in _imports(path)
                     if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
        if bad:
            offenders[str(path.relative_to(CORE))] = bad
    assert not offenders, offenders


def test_the_walk_covers_the_methods():
    walked = {str(path.relative_to(CORE)) for path in CORE.rglob("*.py")}
    assert {"methods/sisa.py", "methods/s3t.py", "methods/__init__.py"} <= walked


def test_no_method_imports_another_method_and_no_component_imports_a_method():
    methods = worker.core.methods.__name__
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        if path.parent == METHODS and path.name == "__init__.py":
            continue  # discovery imports the methods by name, never one of them in code
        # a method may import components only; a component, no method at all (nor the package)
        bad = sorted(name for name in _imports(path)
                     if name == methods or name.startswith(methods + "."))
        if bad:
            offenders[str(path.relative_to(CORE))] = bad
    assert not offenders, offenders
