"""Shared fixtures: real services that skip on a laptop without them and fail under CI=true."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("MEGAFLOW_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("MEGAFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("MEGAFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")


def need(what: str, ok: bool, why: str = "") -> None:
    """Skip when a service is missing — but fail when CI=true, where it must be there."""
    if ok:
        return
    msg = f"{what} not available{': ' + why if why else ''}"
    if CI:
        pytest.fail(f"{msg} (CI=true: services are required)")
    pytest.skip(msg)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_server():
    need("PostgreSQL", port_open("127.0.0.1", 5432))
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"mf_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_server.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from megaflow.db.engine import dispose_all

    dispose_all()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def amqp_server():
    need("RabbitMQ", port_open("127.0.0.1", 5672))
    return AMQP_URL


@pytest.fixture
def amqp_vhost(amqp_server):
    """A fresh RabbitMQ vhost for one test (isolated queues), deleted afterwards."""
    import shutil
    import subprocess

    ctl = shutil.which("rabbitmqctl")
    need("rabbitmqctl", ctl is not None)
    vhost = f"mf_{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    yield amqp_server.rstrip("/") + "/" + vhost
    subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    from megaflow.db.schema import upgrade

    upgrade(url)
    return url


def run_megaflow(args: list[str], data_dir, timeout: float, extra_env: dict | None = None):
    """`python -m megaflow ARGS` on embedded defaults (no MEGAFLOW_* from the caller)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
    env.update(MEGAFLOW_DATA_DIR=str(data_dir), **(extra_env or {}))
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "megaflow", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def docker_engine(monkeypatch) -> str:
    """A Docker engine with `megaflow/base` built (started here if need be); sets DOCKER_HOST; returns its URL.

    Skips on a laptop without one, fails under CI=true (`need`).
    """
    import tempfile

    from megaflow.errors import SandboxError
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        url = ensure_dockerd(data_dir)
        import docker

        client = docker.DockerClient(base_url=url)
        build_base(client)
        client.close()
    except SandboxError as exc:
        need("a Docker engine with megaflow/base", False, str(exc))
    monkeypatch.setenv("DOCKER_HOST", url)
    return url


#: A test file with a parametrized test (one case passes, one fails) and a plain one: the ids the
#: SWE test runner must pass through to pytest.
PARAMETRIZED_TESTS = """\
import pytest


@pytest.mark.parametrize("a,b", [(1, 2), (2, 2)])
def test_lt(a, b):
    assert a < b


def test_plain():
    assert True
"""
