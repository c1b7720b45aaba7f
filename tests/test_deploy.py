"""docker/compose.yaml and docker/Dockerfile agree with the code they deploy."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import need
from typer.main import get_command
from typer.testing import CliRunner

from megaflow.cli.main import app
from megaflow.config import Settings
from queues.topology import DEAD_QUEUE, DLX, EXCHANGE, POOL_DEFAULTS, POOLS, definitions_json

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


def test_pool_threads_agree_with_the_topology_the_env_example_and_the_docs(compose):
    """compose.yaml's defaults, docker/megaflow.env.example and docs/deployment.md's table all say
    POOL_DEFAULTS' threads (issue 21: compose gave the agent 4 where the docs said 8)."""
    example = (ROOT / "docker" / "megaflow.env.example").read_text()
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for pool, (kind, threads) in POOL_DEFAULTS.items():
        var = f"{pool.upper()}_CONCURRENCY"
        env = _env(compose["services"][pool])
        assert env["MEGAFLOW_WORKER_CONCURRENCY"] == f"${{{var}:-{threads}}}", pool
        assert f"# {var}={threads}\n" in example, pool
        row = next(ln for ln in docs.splitlines() if ln.startswith(f"| `{pool}` |"))
        assert f"{kind} ({threads}," in row, f"docs/deployment.md row of {pool}: {row}"


def test_compose_states_its_minimum_version_and_the_docs_name_it():
    head = COMPOSE.read_text().split("\nname:", 1)[0]
    assert "Docker Compose 2.20 or later" in head and "docker/require-compose.sh" in head
    assert "Compose 2.20" in (ROOT / "docs" / "deployment.md").read_text()


@pytest.mark.parametrize(("version", "ok"), [("2.19.1", False), ("v2.20.0", True), ("2.29.7", True),
                                             ("1.29.2", False), (None, False)])
def test_require_compose_refuses_an_older_compose_in_one_line(tmp_path, version, ok):
    fake = tmp_path / "docker"
    body = f"echo {version}" if version else "echo \"docker: 'compose' is not a docker command\" >&2; exit 1"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    proc = subprocess.run(["sh", str(ROOT / "docker" / "require-compose.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}, check=False)
    assert (proc.returncode == 0) is ok, proc.stderr
    if not ok:
        assert proc.stderr.count("\n") == 1 and "needs Docker Compose >= 2.20.0" in proc.stderr


@pytest.mark.parametrize("vhost", ["megaflow", "/", "team-a"])
def test_queue_definitions_name_every_queue_of_the_topology_for_the_vhost_given(tmp_path, vhost):
    out = tmp_path / "definitions.json"
    result = CliRunner().invoke(app, ["queues", "definitions", "--vhost", vhost, "--host", "env-1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    defs = json.loads(out.read_text())
    assert defs["vhosts"] == [{"name": vhost}]
    queues = {q["name"]: q for q in defs["queues"]}
    assert set(queues) == {*POOLS, "env.env-1", DEAD_QUEUE}, "every pool queue and the dead-letter queue"
    assert {e["name"] for e in defs["exchanges"]} == {EXCHANGE.name, DLX.name}
    for item in (*defs["queues"], *defs["exchanges"], *defs["bindings"]):
        assert item["vhost"] == vhost, item
    for name in (*POOLS, "env.env-1"):
        assert queues[name]["arguments"]["x-dead-letter-exchange"] == DLX.name, name
    bound = {(b["source"], b["destination"]) for b in defs["bindings"]}
    assert (DLX.name, DEAD_QUEUE) in bound and {(EXCHANGE.name, n) for n in POOLS} <= bound


def test_shipped_definitions_file_is_the_generators_output_for_the_compose_vhost(compose):
    vhost = compose["services"]["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_VHOST"]
    assert vhost in compose["x-megaflow-env"]["MEGAFLOW_BROKER_URL"].rsplit("/", 1)[-1]
    shipped = (ROOT / "queues" / "definitions.json").read_text()
    assert shipped == definitions_json(vhost=vhost), "run: megaflow queues definitions -o queues/definitions.json"


def test_dockerfile_builds_from_a_python_image_argument_and_installs_every_package():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("ARG PYTHON_IMAGE=python:3.11-slim")
    assert lines[1] == "FROM ${PYTHON_IMAGE} AS system"
    copied = {m.group(1).rstrip("/") for m in re.finditer(r"^COPY (?!--from)(\S+) ", text, re.MULTILINE)}
    for source in copied:
        assert (ROOT / source).exists(), source
    allowed = {ln[1:].rstrip("/") for ln in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    assert copied <= allowed, f"copied but kept out of the context: {copied - allowed}"
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
    check = subprocess.run(["sh", str(ROOT / "docker" / "require-compose.sh")], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr
    for profile in ([], ["--profile", "gpu"]):
        proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profile, "config", "-q"],
                              env={**os.environ, **REQUIRED}, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    # Without the required variables it must refuse, naming what is missing.
    bare = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=bare,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "RABBITMQ_PASSWORD" in proc.stderr


def _requirements(extras: str = "ops") -> list[str]:
    """What `pip install .[extras]` needs, from setup.cfg (no build of the project on the host)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"][extras]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _wheelhouse(python_full_version: str) -> Path:
    """Wheels of every dependency for the image's Python, made once: the build itself has no index.

    `--python-version` picks versions whose Requires-Python admits the image's Python, but pip
    still evaluates markers on this host's, so what only the image's needs (e.g.
    ``async-timeout; python_full_version < "3.11.3"`` on Debian's 3.11.2) is added after.
    """
    reqs = ["setuptools>=68", "wheel", *_requirements()]
    key = hashlib.sha256("\n".join([python_full_version, *reqs]).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"megaflow-wheelhouse-{key}"
    while not (path / ".complete").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(path), "--only-binary=:all:",
                               "--python-version", python_full_version, *reqs],
                              capture_output=True, text=True, check=False)
        need("the package registry (pip download)", proc.returncode == 0, proc.stderr[-1000:])
        reqs = _missing_for(path, python_full_version)
        if not reqs:
            (path / ".complete").touch()
    return path


def _missing_for(wheels: Path, python_full_version: str) -> list[str]:
    """Requirements of the wheels in `wheels` that hold on `python_full_version` but have no wheel there."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    env = {**default_environment(), "python_full_version": python_full_version,
           "python_version": ".".join(python_full_version.split(".")[:2]), "extra": ""}
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels.glob("*.whl")}
    missing = set()
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode().splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker and req.marker.evaluate(env) and canonicalize_name(req.name) not in have:
                    missing.add(f"{req.name}{req.specifier}")
    return sorted(missing)


def _build_context(dest: Path, wheels: Path) -> Path:
    """The build context `docker build .` would send: what Dockerfile.dockerignore lets in.

    Made here because the engine's classic builder (Debian's dockerd, no BuildKit) reads only
    a root `.dockerignore`; docker/wheels/ gets the wheelhouse (hard links, not copies).
    """
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for name in (ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name == "docker/wheels":
            shutil.copytree(wheels, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".complete"))
        elif src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    shutil.copy2(DOCKERFILE, dest / "docker" / "Dockerfile")
    return dest


@pytest.fixture(scope="module")
def docker_client():
    docker = pytest.importorskip("docker")
    from megaflow.errors import SandboxError
    from megaflow.sandbox.contexts import context_dir
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        client = docker.DockerClient(base_url=ensure_dockerd(data_dir))
        build_base(client)  # megaflow/base: Debian's own python3 (PEP 668), runs as root
        build_image(client, context_dir("python"), "megaflow/python")  # the same + venv, runs as `agent`
    except SandboxError as exc:
        need("a Docker engine with megaflow/base and megaflow/python", False, str(exc))
    yield client
    client.close()


@pytest.mark.integration
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("base", "base_user"), [("megaflow/base", ""), ("megaflow/python", "agent")],
                         ids=["root-base", "non-root-base"])
def test_image_builds_from_the_shipped_dockerfile_and_runs_the_cli(docker_client, tmp_path, base, base_user):
    """docker/Dockerfile as shipped, on a local Debian base (no registry), offline from a wheelhouse.

    The slowest test of this file. On 2 busy cores: 75-125 s per base the first time (apt, then
    pip from wheels; plus ~25 s once for the wheelhouse), ~45 s per base after a source change
    (only the last layers), ~5 s for both when nothing changed (the builder's layer cache).
    """
    docker = pytest.importorskip("docker")
    assert docker_client.images.get(base).attrs["Config"]["User"] == base_user
    version = docker_client.containers.run(base, ["python3", "-c", "import platform; print(platform.python_version())"],
                                           remove=True, network_mode="none").decode().strip()
    context = _build_context(tmp_path / "context", _wheelhouse(version))
    tag = f"megaflow-test/{base.split('/')[-1]}:latest"
    started = time.monotonic()
    try:
        docker_client.images.build(path=str(context), dockerfile="docker/Dockerfile", tag=tag, pull=False,
                                   buildargs={"PYTHON_IMAGE": base, "OFFLINE": "1"},
                                   network_mode="host", rm=True, forcerm=True)  # host: apt's mirror
    except (docker.errors.BuildError, docker.errors.APIError) as exc:  # the log's tail, not a repr
        log = getattr(exc, "build_log", [])
        tail = "".join(str(item.get("stream") or item.get("error") or "") for item in log)[-3000:]
        pytest.fail(f"docker build on {base} failed: {exc}\n{tail}")
    print(f"built {tag} on {base} in {time.monotonic() - started:.0f}s")

    def run(*args: str, entrypoint: str | None = None, user: str = "") -> str:
        return docker_client.containers.run(tag, list(args), entrypoint=entrypoint, user=user, remove=True,
                                            network_mode="none").decode()

    for user in ("", "root", base_user or "nobody"):  # the image's own user, root, and another one
        assert "worker" in run("--help", user=user), user
        assert "megaflow worker" in run("worker", "--help", user=user), user
    ident = run("-c", "import os, sys; print(os.getuid(), sys.prefix)", entrypoint="python")
    assert ident.split() == ["10001", "/opt/megaflow"], "runs as megaflow, from the virtualenv"
    tools = run("-c", "command -v bwrap; command -v tini", entrypoint="sh")
    assert tools.split() == ["/usr/bin/bwrap", "/usr/bin/tini"]


@pytest.mark.integration
def test_a_base_without_apt_is_refused_naming_what_to_preinstall(docker_client, tmp_path):
    """No apt-get (and so nothing to install bubblewrap or tini with): one clear line, not apt's error."""
    import io

    docker = pytest.importorskip("docker")
    base = "megaflow-test/no-apt:latest"
    docker_client.images.build(fileobj=io.BytesIO(b"FROM megaflow/base\nRUN rm /usr/bin/apt-get\nUSER agent\n"),
                               tag=base, pull=False, rm=True, forcerm=True)
    context = tmp_path / "context"
    (context / "docker" / "wheels").mkdir(parents=True)
    shutil.copy2(DOCKERFILE, context / "docker" / "Dockerfile")
    with pytest.raises(docker.errors.BuildError) as failed:
        docker_client.images.build(path=str(context), dockerfile="docker/Dockerfile", tag="megaflow-test/refused",
                                   buildargs={"PYTHON_IMAGE": base}, pull=False, rm=True, forcerm=True)
    log = "".join(str(item.get("stream") or item.get("error") or "") for item in failed.value.build_log)
    assert f"the base image {base} lacks bubblewrap tini python3-venv and cannot install it" in log
    assert "use a base image with these preinstalled: bubblewrap tini python3-venv" in log
