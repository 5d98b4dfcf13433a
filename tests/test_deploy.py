"""The shipped deployment, checked as far as a machine without Docker allows.

docker-compose (Debian's 1.29, installed by .ci/run) validates the compose file; the rest reads
the files as the containers would: every variable they set is one the code reads, services start
in order on healthchecks, the GPU worker reserves a device, the one-shot services create exactly
the topics and the bucket the code uses, Prometheus scrapes every process that serves /metrics,
and Grafana is provisioned with the datasource and the dashboard. No image is built or pulled
here, and MinIO and Grafana do not run: what they do is checked on paper.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import botocore
import pytest
import yaml

from worker.config import Settings, split_s3_url

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def ours() -> dict[str, dict]:
    """The services that run this repository's image."""
    return {name: service for name, service in services().items() if "build" in service}


def default(setting: str):
    """A setting's default, which is what a container gets unless compose sets the variable."""
    return Settings.model_fields[setting].default


def _docker_compose(compose_file: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    return subprocess.run([tool, "-f", str(compose_file), "config", "--quiet"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


def test_docker_compose_validates_the_file(tmp_path):
    done = _docker_compose(COMPOSE)
    assert done.returncode == 0, done.stderr
    # and it is a real check: an unknown start condition is refused
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_happy", 1))
    assert _docker_compose(broken).returncode != 0


def test_every_variable_the_containers_get_is_one_the_code_reads():
    read_by_us = {f"UNLEARN_{name.upper()}" for name in Settings.model_fields}
    # the S3 client (botocore, under s3fs) reads the usual AWS variables itself
    botocore_dir = Path(botocore.__file__).parent
    read_by_botocore = (botocore_dir / "credentials.py").read_text() + (botocore_dir / "configprovider.py").read_text()
    for name, service in ours().items():
        for variable in service["environment"]:
            if variable.startswith("UNLEARN_"):
                assert variable in read_by_us, f"{name}: nothing reads {variable}"
            else:
                assert f"'{variable}'" in read_by_botocore, f"{name}: nothing reads {variable}"
    image_env = re.findall(r"\b(UNLEARN_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text())
    assert image_env and set(image_env) <= read_by_us
    build_args = {arg for service in ours().values() if isinstance(service["build"], dict)
                  for arg in service["build"].get("args", {})}
    assert build_args <= set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))


def test_services_start_in_order_and_report_their_health():
    all_services = services()
    for name, service in all_services.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, f"{name} runs for good but has no healthcheck"
        for dependency, rule in service.get("depends_on", {}).items():
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dependency], f"{name} waits on {dependency}'s health"
            else:
                assert condition == "service_completed_successfully", f"{name}: {condition}"
                assert all_services[dependency].get("restart") == "no", f"{dependency} is not a one-shot"
    for name in ("intake", "worker"):
        assert set(all_services[name]["depends_on"]) >= {"kafka-init", "minio-init", "migrate", "redis"}
    [device] = all_services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_one_shot_services_create_the_topics_and_the_bucket_the_code_uses():
    all_services = services()
    environment = all_services["intake"]["environment"]
    bucket, _ = split_s3_url(environment["UNLEARN_ARTIFACT_DIR"])
    assert f"store/{bucket}" in all_services["minio-init"]["command"][0]
    assert environment["UNLEARN_S3_ENDPOINT_URL"] == "http://minio:9000"
    created = re.search(r"for topic in ([^;]+);", all_services["kafka-init"]["command"][0]).group(1).split()
    assert sorted(created) == sorted(default(f"topic_{kind}") for kind in ("requests", "dlq", "versions", "receipts"))


def _container_port(service: dict) -> int:
    """The one port a service listens on for the others (`expose`, or the container side of `ports`)."""
    [port] = service.get("expose") or [mapping.split(":")[-1] for mapping in service["ports"]]
    return int(port)


def test_prometheus_scrapes_every_process_that_serves_metrics():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {target for job in config["scrape_configs"] for static in job["static_configs"]
               for target in static["targets"]}
    serving = {name: service for name, service in ours().items() if service.get("restart") != "no"}
    assert targets == {f"{name}:{_container_port(service)}" for name, service in serving.items()}
    assert _container_port(serving["intake"]) == default("intake_metrics_port")
    assert _container_port(serving["worker"]) == default("worker_metrics_port")
    command = serving["serve"]["command"]
    assert _container_port(serving["serve"]) == int(command[command.index("--port") + 1])


def test_grafana_is_provisioned_with_a_prometheus_datasource_and_the_dashboard():
    all_services = services()
    mounts = {PurePosixPath(target.removesuffix(":ro")): Path(ROOT / source)
              for source, target in (volume.split(":", 1) for volume in all_services["grafana"]["volumes"])}
    by_file = {source.resolve(): target for target, source in mounts.items()}
    datasources = yaml.safe_load((DEPLOY / "grafana" / "datasources.yml").read_text())
    assert by_file[(DEPLOY / "grafana" / "datasources.yml").resolve()].parent == PurePosixPath(
        "/etc/grafana/provisioning/datasources")
    [source] = datasources["datasources"]
    host, port = re.fullmatch(r"http://([a-z-]+):(\d+)", source["url"]).groups()
    assert source["type"] == "prometheus" and source["isDefault"]
    assert _container_port(all_services[host]) == int(port)
    providers = yaml.safe_load((DEPLOY / "grafana" / "dashboards.yml").read_text())["providers"]
    assert by_file[(DEPLOY / "grafana" / "dashboards.yml").resolve()].parent == PurePosixPath(
        "/etc/grafana/provisioning/dashboards")
    dashboard_at = by_file[(DEPLOY / "grafana" / "unlearning.json").resolve()]
    assert [p["options"]["path"] for p in providers] == [str(dashboard_at.parent)]
    variables = yaml.safe_load((DEPLOY / "grafana" / "unlearning.json").read_text())["templating"]["list"]
    assert {"type": "datasource", "query": source["type"]}.items() <= variables[0].items()


SECRETS_SCRIPT = DEPLOY / "make-secrets.sh"


def test_only_the_model_server_is_published_and_grafana_only_on_loopback():
    """Found: every port was published on every interface with no authentication (Kafka, Postgres
    as superuser, Redis, MinIO's root keys, Prometheus, Grafana with its default password)."""
    published = {name: service["ports"] for name, service in services().items() if "ports" in service}
    assert published == {"serve": ["8080:8080"], "grafana": ["127.0.0.1:3000:3000"]}
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("kafka", "postgres", "redis", "minio", "intake", "worker", "prometheus"):
        assert services()[name]["networks"] == ["backend"], name


def test_no_password_is_written_in_the_compose_file_and_every_secret_is_generated(tmp_path):
    text = COMPOSE.read_text()
    for placeholder in ("unlearn-minio-secret", "postgres:unlearn@", "POSTGRES_PASSWORD:", "GF_SECURITY_ADMIN_PASSWORD:",
                        "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD:"):
        assert placeholder not in text, placeholder
    declared = yaml.safe_load(text)["secrets"]
    used = {secret for service in services().values() for secret in service.get("secrets", [])}
    assert used == set(declared)
    assert all(spec["file"] == f"./secrets/{name}" for name, spec in declared.items())

    # the script writes every one of them, random, and keeps what exists
    (tmp_path / "deploy").mkdir()
    shutil.copy2(SECRETS_SCRIPT, tmp_path / "deploy" / SECRETS_SCRIPT.name)
    for _ in range(2):
        subprocess.run(["sh", str(tmp_path / "deploy" / SECRETS_SCRIPT.name)], check=True, capture_output=True, timeout=60)
        written = {p.name: p.read_text() for p in (tmp_path / "secrets").iterdir()}
        if _ == 0:
            first = written
    assert written == first and set(written) == set(declared)
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0
    passwords = [first[name].strip() for name in ("postgres_superuser_password", "postgres_unlearn_password",
                                                  "redis_password", "minio_root_password", "serve_token",
                                                  "grafana_admin_password")]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 32 for p in passwords)
    url = first["unlearn_database_url"].strip()
    assert url == f"postgresql://unlearn:{first['postgres_unlearn_password'].strip()}@postgres:5432/unlearning"
    assert first["unlearn_celery_broker"].strip() == f"redis://:{first['redis_password'].strip()}@redis:6379/0"
    worker_key = first["minio_worker_key"].split()[0]
    assert f"aws_access_key_id = {worker_key}" in first["aws_credentials_worker"]
    # the signing key is an Ed25519 key the worker loads, and verify_key its public half
    from worker import signing

    signer = signing.Signer(signing.load_private_key(tmp_path / "secrets" / "signing_key"))
    assert first["verify_key"].encode() == signer.public_pem()


def test_each_process_gets_least_privilege():
    all_services = services()
    serve = all_services["serve"]
    # the model server: no database at all, a read-only key on the bucket, a bearer token
    assert "UNLEARN_DATABASE_URL" not in serve["environment"] and "UNLEARN_SECRETS_DIR" not in serve["environment"]
    assert set(serve["secrets"]) == {"aws_credentials_serve", "serve_token", "verify_key"}
    # the worker alone holds the signing key; the server and the intake (for `unlearn verify`) its public half
    assert [name for name, service in services().items() if "signing_key" in service.get("secrets", [])] == ["worker"]
    assert all_services["worker"]["environment"]["UNLEARN_SIGNING_KEY_FILE"] == "/run/secrets/signing_key"
    for name in ("serve", "intake"):
        assert all_services[name]["environment"]["UNLEARN_VERIFY_KEY_FILE"] == "/run/secrets/verify_key"
    assert all_services["intake"]["environment"]["UNLEARN_ALLOWED_SOURCES"]
    read_only = json.loads((DEPLOY / "minio" / "serve.json").read_text())
    actions = {a for statement in read_only["Statement"] for a in statement["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject"}
    # the others reach PostgreSQL as `unlearn`, which is no superuser; MinIO's root keys stay with MinIO
    roles = (DEPLOY / "postgres" / "init-roles.sh").read_text()
    assert "CREATE ROLE unlearn LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE" in roles
    for name, service in ours().items():
        assert not {"minio_root_user", "minio_root_password", "postgres_superuser_password"} & set(service.get("secrets", []))
    assert "--requirepass" in all_services["redis"]["command"][0]
    assert all_services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")


def test_settings_read_secret_files_named_after_their_variables(tmp_path, monkeypatch):
    from worker.config import get_settings

    (tmp_path / "unlearn_database_url").write_text("postgresql://unlearn:pw@postgres:5432/unlearning\n")
    monkeypatch.setenv("UNLEARN_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("UNLEARN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().database_url == "postgresql://unlearn:pw@postgres:5432/unlearning"
        assert ("UNLEARN_DATABASE_URL", "postgresql://unlearn:***@postgres:5432/unlearning") in get_settings().public_items()
    finally:
        get_settings.cache_clear()
