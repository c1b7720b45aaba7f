"""The reaper against real workers: an env worker SIGKILLed with sandboxes alive leaks nothing.

Real RabbitMQ, PostgreSQL and Celery workers; the local backend (bubblewrap) and the
docker backend. Skips without the services, fails under CI=true.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import time
import uuid

import pytest
from conftest import docker_engine, need
from sqlalchemy import select, update

from megaflow import Client
from megaflow.db import states
from megaflow.db.models import Episode, SandboxRow, utcnow
from megaflow.local_stack import WorkerProcess
from megaflow.reaper import CREATED_BUCKET_S, CREATED_LABEL, reap, sandbox_labels
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.registry import make_backend

pytestmark = pytest.mark.integration

N_EPISODES = 4


@pytest.fixture(params=["local", "docker"])
def kind(request, monkeypatch):
    if request.param == "local":
        need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
        return "local", {}
    url = docker_engine(monkeypatch)
    return "docker", {"DOCKER_HOST": url}


@pytest.fixture
def reap_cluster(make_cluster, tmp_path, kind):
    backend_kind, env = kind
    quiet = {**env, "MEGAFLOW_REAP_INTERVAL_S": "3600"}  # this test reaps by hand
    # A host name of its own: the reaper must never touch another test's sandboxes.
    cluster = make_cluster(f"reap-{uuid.uuid4().hex[:8]}", env=quiet)
    backend = make_backend(backend_kind, **({"root": tmp_path} if backend_kind == "local" else {}))
    yield cluster.settings, cluster.workers, backend_kind, backend, env
    cluster.stop()  # before the sweep below, so that no worker makes a sandbox after it
    for sandbox_id in backend.list_ids({"megaflow.host": cluster.settings.host}):  # never leak, even on failure
        backend.destroy(sandbox_id)

def spec(kind: str) -> dict:
    return {
        "name": "reap",
        "model": {"type": "scripted", "latency_s": 5.0,
                  "replies": ["```bash\necho hi > f.txt\n```", "```bash\nsubmit\n```"]},
        "sandbox": {"type": kind, "memory_mb": 256},
        "limits": {"episode_timeout_s": 60, "eval_timeout_s": 30},
        "tasks": [{"instance_id": f"t{i}", "instruction": "write f.txt", "check": "test -f f.txt"}
                  for i in range(N_EPISODES)],
    }


def live_rows(client: Client, run_id: str) -> list[SandboxRow]:
    with client.session() as s:
        # Not the claims of sandboxes still being created (state `creating`): they hold none yet.
        return list(s.execute(select(SandboxRow).where(SandboxRow.run_id == run_id, SandboxRow.state != "creating",
                                                       SandboxRow.destroyed_at.is_(None))).scalars())


def unrecorded(backend, settings, run_id: str, minutes_ago: float, kind: str) -> str:
    """A labelled sandbox with no row: what a worker killed between create and record leaves."""
    labels = sandbox_labels(settings.host, run_id, f"ghost{minutes_ago:g}")
    labels[CREATED_LABEL] = str(int((time.time() - minutes_ago * 60) // CREATED_BUCKET_S))
    return backend.create(SandboxConfig(type=kind, memory_mb=256), labels).id


def test_sigkilled_env_worker_leaks_no_sandbox(reap_cluster):
    settings, workers, kind, backend, _ = reap_cluster
    client = Client(settings)
    run_id = client.submit(spec(kind))
    deadline = time.monotonic() + 90
    while len(live_rows(client, run_id)) < N_EPISODES:
        assert time.monotonic() < deadline, "episodes were not provisioned"
        assert workers["env"].alive(), f"env worker died; see {workers['env'].log_path}"
        time.sleep(0.2)
    old = unrecorded(backend, settings, run_id, minutes_ago=10, kind=kind)
    young = unrecorded(backend, settings, run_id, minutes_ago=0, kind=kind)
    workers["env"].kill(signal.SIGKILL)
    host = {"megaflow.host": settings.host}
    assert len(backend.list_ids(host)) == N_EPISODES + 2

    # Episodes still running, leases valid: only the old unrecorded sandbox goes.
    report = reap(settings, backends=[kind])
    assert report["destroyed"] == [old] and report["rows"] == 0 and not report["errors"], report
    assert len(live_rows(client, run_id)) == N_EPISODES and young in backend.list_ids(host)

    # Half the episodes end (as the run's cancellation or deadline would end them).
    rows = live_rows(client, run_id)
    ended = [r.episode_id for r in rows[: N_EPISODES // 2]]
    with client.session() as s:
        s.execute(update(Episode).where(Episode.id.in_(ended)).values(
            state=states.CANCELLED, finished_at=utcnow() - dt.timedelta(minutes=5)))
    report = reap(settings, backends=[kind])
    assert report["rows"] == len(ended), report
    assert {r.episode_id for r in live_rows(client, run_id)}.isdisjoint(ended)

    # The others' leases run out; the young unrecorded sandbox is past its grace by then.
    later = utcnow() + dt.timedelta(hours=2)
    report = reap(settings, backends=[kind], now=later)
    assert report["rows"] == N_EPISODES - len(ended) and report["orphans"] == 1, report
    assert backend.list_ids(host) == []
    assert live_rows(client, run_id) == []
    with client.session() as s:
        assert set(s.execute(select(SandboxRow.state).where(SandboxRow.run_id == run_id)).scalars()) == {"destroyed"}
    if kind == "local":
        assert [p for p in (settings.data_dir / "sandboxes").iterdir() if p.name.startswith("mf-")] == []


def test_env_worker_reaps_its_host_periodically(reap_cluster):
    settings, workers, kind, backend, env = reap_cluster
    if kind != "local":
        pytest.skip("the timer is backend-independent; once is enough")
    workers["env"].stop()
    workers["env"] = WorkerProcess("env", settings, name="env-timer",
                                   extra_env={**env, "MEGAFLOW_REAP_INTERVAL_S": "0.5"}).start()
    ghost = unrecorded(backend, settings, "r0", minutes_ago=10, kind=kind)
    other_host = backend.create(SandboxConfig(type=kind), {**sandbox_labels("elsewhere"), CREATED_LABEL: "0"})
    try:
        deadline = time.monotonic() + 30
        while ghost in backend.list_ids({"megaflow.host": settings.host}):
            assert time.monotonic() < deadline, f"not reaped; see {workers['env'].log_path}"
            assert workers["env"].alive(), f"env worker died; see {workers['env'].log_path}"
            time.sleep(0.2)
        assert other_host.id in backend.list_ids({"megaflow.host": "elsewhere"}), "another host's sandbox was reaped"
    finally:
        backend.destroy(other_host.id)
