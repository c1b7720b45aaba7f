"""Shared fixtures: real services that skip on a laptop without them and fail under CI=true.

* `pg_url`, `amqp_vhost`: a fresh PostgreSQL database / RabbitMQ vhost per test;
* `cluster` / `make_cluster`: real Celery workers of the three pools on them (or on the embedded stack);
* the rule that keeps `pytest -m "not integration"` fast: a test that uses a service fixture, `need()`
  or `docker_engine()` without the `integration` mark fails, saying so.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("MEGAFLOW_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("MEGAFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("MEGAFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")


def need(what: str, ok: bool, why: str = "") -> None:
    """Skip when a service is missing — but fail when CI=true, where it must be there.

    Either way the current test needs WHAT: unless it is marked `integration` it fails (see
    `_charge_service`), so `pytest -m "not integration"` never waits on a service.
    """
    _charge_service(what)
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


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database on SERVER (an admin URL), dropped on exit."""
    from sqlalchemy import create_engine, text

    name = f"mf_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from megaflow.db.engine import dispose_all

        dispose_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="session")
def amqp_server():
    need("RabbitMQ", port_open("127.0.0.1", 5672))
    return AMQP_URL


@contextmanager
def fresh_vhost(server: str) -> Iterator[str]:
    """A fresh RabbitMQ vhost on SERVER (isolated queues), deleted on exit."""
    import shutil
    import subprocess

    ctl = shutil.which("rabbitmqctl")
    need("rabbitmqctl", ctl is not None)
    vhost = f"mf_{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    try:
        yield server.rstrip("/") + "/" + vhost
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)


@pytest.fixture
def amqp_vhost(amqp_server):
    """A fresh RabbitMQ vhost for one test (isolated queues), deleted afterwards."""
    with fresh_vhost(amqp_server) as url:
        yield url


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

    _charge_service("a Docker engine")
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


POOLS = ("model", "agent", "env")


class Cluster:
    """Real Celery workers (`celery worker` subprocesses) sharing one `Settings`.

    `workers` maps a key (the pool, unless `start` is given another) to its `WorkerProcess`.
    """

    def __init__(self, settings):
        self.settings = settings
        self.workers: dict = {}
        self._client = None

    def start(self, pool: str, name: str | None = None, env: dict | None = None,
              extra_args: list[str] | None = None, key: str | None = None):
        """Start one more worker of POOL (named NAME, default the pool) and return it."""
        from megaflow.local_stack import WorkerProcess

        worker = WorkerProcess(pool, self.settings, name=name or pool, extra_env=env, extra_args=extra_args)
        self.workers[key or pool] = worker.start()
        return worker

    @property
    def client(self):
        """A `megaflow.Client` on these settings (made once)."""
        if self._client is None:
            from megaflow import Client

            self._client = Client(self.settings)
        return self._client

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


@contextmanager
def running_cluster(settings, *, name: str = "", env: dict | None = None, extra_args: list[str] | None = None,
                    pools=POOLS) -> Iterator[Cluster]:
    """Migrate SETTINGS' database, start a worker per pool (named NAME + pool), stop them all on exit."""
    from megaflow.db.schema import upgrade

    upgrade(settings.resolved_database_url())
    cluster = Cluster(settings)
    try:
        for pool in pools:
            cluster.start(pool, name=f"{name}{pool}", env=env, extra_args=extra_args)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_cluster(request, tmp_path):
    """A factory of clusters, all stopped at the end of the test (before their database and vhost go).

    `make_cluster(host, *, stack="rabbitmq", name="", env=None, extra_args=None, pools=POOLS, **settings)`:
    stack "rabbitmq" puts state in a fresh PostgreSQL database and queues in a fresh RabbitMQ vhost,
    "embedded" uses the embedded defaults (SQLite state and transport) under the test's tmp_path;
    ENV is extra environment for every worker; SETTINGS are more `Settings` fields.
    """
    from megaflow import Settings

    with ExitStack() as exits:
        def make(host: str, *, stack: str = "rabbitmq", name: str = "", env: dict | None = None,
                 extra_args: list[str] | None = None, pools=POOLS, **settings) -> Cluster:
            database = broker = None
            if stack == "rabbitmq":
                database = exits.enter_context(fresh_database(request.getfixturevalue("pg_server")))
                broker = exits.enter_context(fresh_vhost(request.getfixturevalue("amqp_server")))
            elif stack != "embedded":
                raise ValueError(f"stack must be rabbitmq or embedded, not {stack!r}")
            config = Settings(data_dir=tmp_path, database_url=database, broker_url=broker, host=host, **settings)
            return exits.enter_context(running_cluster(config, name=name, env=env, extra_args=extra_args,
                                                       pools=pools))

        yield make


@pytest.fixture
def cluster(request, make_cluster) -> Cluster:
    """Workers of the three pools on a fresh PostgreSQL database and RabbitMQ vhost.

    What differs between tests is a `cluster` mark on the test or its module, whose keywords are
    `make_cluster`'s (`pytestmark = pytest.mark.cluster(host="it-host", env={...})`); an indirect
    parameter (a dict) updates them per case, e.g.
    `@pytest.mark.parametrize("cluster", [{"stack": "embedded"}], indirect=True)`.
    """
    mark = request.node.get_closest_marker("cluster")
    kwargs = {"host": "it-host", **(mark.kwargs if mark else {}), **getattr(request, "param", {})}
    return make_cluster(**kwargs)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's Hugging Face tokenizer, loaded once per test process.

    From the converted directory of megaflow.model.gguf_cache: the first load on a machine
    converts the GGUF (~15 s idle), every later one (this process's, workers') reads it in ~1 s.
    Shared: wrap it (`HFChatTokenizer(smollm2_tokenizer)`), do not change it.
    """
    import importlib.util

    for package in ("transformers", "gguf"):
        need(package, importlib.util.find_spec(package) is not None, "pip install 'megaflow[model]'")
    from megaflow.model.smollm import INSTALL_HINT, smollm2_available

    need("SmolLM2 weights", smollm2_available(), INSTALL_HINT)
    from transformers import AutoTokenizer

    from megaflow.model.gguf_cache import hf_source

    return AutoTokenizer.from_pretrained(hf_source("smollm2"), local_files_only=True)


# -- the rule: a test that needs a real service is marked `integration` ---------------------------

#: Fixtures that reach a real service (PostgreSQL, RabbitMQ, Celery workers) or load the real model.
SERVICE_FIXTURES = frozenset({"pg_server", "pg_url", "amqp_server", "amqp_vhost", "make_cluster", "cluster",
                              "smollm2_tokenizer"})
_unmarked_use = pytest.StashKey[list]()
_current: list = [None]  # the test being set up or run: `need` and `docker_engine` charge it


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster(**kwargs): settings of the `cluster` fixture (see make_cluster)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Before `-m` selects: a test using a service fixture without the `integration` mark fails."""
    for item in items:
        used = sorted(SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())))
        if used and item.get_closest_marker("integration") is None:
            item.stash[_unmarked_use] = [f"fixture {name}" for name in used]


def _charge_service(what: str) -> None:
    """Record that the current test needs WHAT; it fails if it is not marked `integration`."""
    item = _current[0]
    if item is not None and item.get_closest_marker("integration") is None:
        item.stash.setdefault(_unmarked_use, []).append(what)


def _check_marked(item) -> None:
    used = item.stash.get(_unmarked_use, [])
    if used:
        pytest.fail(f"{item.nodeid} needs a real service ({', '.join(used)}) but is not marked integration: "
                    "add `pytestmark = pytest.mark.integration` (or the mark on the test)", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current[0] = item
    _check_marked(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # Checked again here: a session fixture set up for this test (e.g. pg_server) calls `need` after
    # setup began, and failing inside it would poison the fixture for every later test.
    _check_marked(item)
    try:
        return (yield)
    finally:
        _check_marked(item)


def pytest_runtest_logfinish():
    _current[0] = None


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
