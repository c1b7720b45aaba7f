"""docker/compose.yaml and docker/Dockerfile agree with the code they deploy."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from megaflow.cli.main import app
from megaflow.config import Settings
from queues.topology import POOLS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
#: The variables compose.yaml requires (`${VAR:?...}`), as a user's docker/.env would set them.
REQUIRED = {"RABBITMQ_PASSWORD": "r", "POSTGRES_PASSWORD": "p", "MEGAFLOW_FLOWER_BASIC_AUTH": "ops:f",
            "MEGAFLOW_HOST": "env-1", "DOCKER_GID": "999"}
MEGAFLOW_SERVICES = {"migrate", "agent", "model", "env", "flower", "metrics"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _needs(service: dict) -> dict:
    deps = service.get("depends_on", {})
    return deps if isinstance(deps, dict) else {d: {"condition": "service_started"} for d in deps}


def test_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"rabbitmq", "postgres", "vllm", *MEGAFLOW_SERVICES}
    assert services["vllm"]["profiles"] == ["gpu"]
    assert [s for s, d in services.items() if "profiles" in d] == ["vllm"], "all else starts by default"
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("rabbitmq", "postgres", "vllm"):
        assert "test" in services[name]["healthcheck"], name


def test_megaflow_services_run_real_cli_commands_on_one_image(compose):
    commands = get_command(app).commands
    for name in MEGAFLOW_SERVICES:
        service = compose["services"][name]
        assert service["image"] == "${MEGAFLOW_IMAGE:-megaflow:latest}", name
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}, name
        cmd = service["command"]
        assert cmd[0] in commands, f"{name}: `megaflow {cmd[0]}` does not exist"
        if cmd[0] == "worker":
            assert cmd[1] == name and name in POOLS
    assert compose["services"]["migrate"]["command"] == ["db", "upgrade"]
    assert set(POOLS) <= set(compose["services"]), "one service per pool"


def test_every_megaflow_service_finds_broker_and_database(compose):
    fields = Settings.model_fields
    for name in MEGAFLOW_SERVICES:
        env = _env(compose["services"][name])
        assert env["MEGAFLOW_BROKER_URL"].startswith("amqp://"), name
        assert env["MEGAFLOW_DATABASE_URL"].startswith("postgresql+psycopg2://"), name
        for var in env:
            # Every MEGAFLOW_ variable set must be one the code reads.
            if var.startswith("MEGAFLOW_") and var not in ("MEGAFLOW_FLOWER_BASIC_AUTH", "MEGAFLOW_WORKER_CONCURRENCY"):
                assert var.removeprefix("MEGAFLOW_").lower() in fields, f"{name}: {var} is read by nothing"


def test_env_workers_drive_the_hosts_docker_under_their_own_host_name(compose):
    env_service = compose["services"]["env"]
    env = _env(env_service)
    assert env["MEGAFLOW_HOST"].startswith("${MEGAFLOW_HOST:?"), "no default: each env host must name itself"
    assert "/var/run/docker.sock:/var/run/docker.sock" in env_service["volumes"]
    assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env_service["group_add"], "the image's user needs the socket's group"


def test_flower_requires_credentials_and_metrics_are_served(compose):
    flower = compose["services"]["flower"]
    assert flower["command"][:3] == ["flower", "--address", "0.0.0.0"]
    assert _env(flower)["MEGAFLOW_FLOWER_BASIC_AUTH"].startswith("${MEGAFLOW_FLOWER_BASIC_AUTH:?")
    assert any(p.endswith(":5555:5555") for p in flower["ports"])
    metrics = compose["services"]["metrics"]
    assert any(p.endswith(":9808:9808") for p in metrics["ports"]) and "9808" in metrics["command"]


def test_startup_order(compose):
    services = compose["services"]
    assert _needs(services["migrate"]) == {"postgres": {"condition": "service_healthy"}}
    for name in ("agent", "model", "env", "metrics"):
        needs = _needs(services[name])
        assert needs["migrate"]["condition"] == "service_completed_successfully", name
        assert needs["rabbitmq"]["condition"] == needs["postgres"]["condition"] == "service_healthy", name
    assert _needs(services["model"])["vllm"] == {"condition": "service_healthy", "required": False}
    assert services["migrate"]["restart"] == "no"


def test_dockerfile_builds_from_a_python_image_argument_and_installs_every_package():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("ARG PYTHON_IMAGE=python:3.11-slim")
    assert lines[1] == "FROM ${PYTHON_IMAGE}"
    copied = {m.group(1) for m in re.finditer(r"^COPY (\S+) ", text, re.MULTILINE)}
    for source in copied:
        assert (ROOT / source).exists(), source
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = {p.strip().split(".")[0] for p in cfg["options.packages.find"]["include"].split() if p.strip()}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert 'ENTRYPOINT ["tini", "--", "megaflow"]' in text
    assert re.search(r"^USER megaflow$", text, re.MULTILINE)
    assert (ROOT / "docker" / "Dockerfile.dockerignore").exists()


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if not plugin or plugin.returncode != 0:
        pytest.skip("`docker compose` (v2) is not installed; the YAML checks above still ran")
    for profile in ([], ["--profile", "gpu"]):
        proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profile, "config", "-q"],
                              env={**os.environ, **REQUIRED}, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    # Without the required variables it must refuse, naming what is missing.
    bare = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=bare,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "RABBITMQ_PASSWORD" in proc.stderr
