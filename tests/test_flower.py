"""`megaflow flower` against real workers, seen through a real headless Chromium."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from browser import ARTIFACTS, chromium, chromium_binary, free_port, megaflow, stop, wait_http
from conftest import need

from megaflow import Client
from megaflow.local_stack import settings_env
from megaflow.ops.flower import AUTH_ENV, FlowerAuthError, check_auth, is_loopback

SCRIPT = ["```bash\necho {step} >> trace.txt\n```", "```bash\nsubmit\n```"]


def small_spec(name: str, n_tasks: int = 2, rollouts: int = 2) -> dict:
    return {
        "name": name,
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": SCRIPT},
        "sandbox": {"type": "memory"},
        "tasks": [{"instance_id": f"{name}-{i}", "instruction": "append a line", "check": "true"}
                  for i in range(n_tasks)],
    }


def test_loopback_and_auth_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("flower.example")
    assert check_auth("127.0.0.1", None) is None
    assert check_auth("0.0.0.0", "ops:s3cret") == "ops:s3cret"
    with pytest.raises(FlowerAuthError, match=AUTH_ENV):
        check_auth("0.0.0.0", None)
    with pytest.raises(FlowerAuthError) as err:
        check_auth("0.0.0.0", "ops:s3cret,admin")
    assert "s3cret" not in str(err.value)


def _wait_for(predicate, what: str, timeout: float = 30.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _datatable(base: str, search: str = "") -> list[dict]:
    params = {"draw": 1, "start": 0, "length": 500, "search[value]": search,
              "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "received"}
    return httpx.get(f"{base}/tasks/datatable", params=params, timeout=5).json()["data"]


@pytest.mark.integration
# Three pools started with -E (task events), as `megaflow worker` starts them.
@pytest.mark.cluster(host="flower-host", name="flw-", env={"MEGAFLOW_WORKER_CONCURRENCY": "2"}, extra_args=["-E"])
def test_flower_shows_workers_and_the_runs_tasks(cluster, tmp_path):
    need("chromium", chromium_binary() is not None, "apt-get install chromium")
    settings, workers = cluster.settings, list(cluster.workers.values())
    port = free_port()
    log = tmp_path / "flower.log"
    proc = megaflow(["flower", "--port", str(port)], settings_env(settings), log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(f"{base}/healthcheck", proc, log).status_code == 200
        names = [w.name for w in workers]

        def workers_seen():
            data = httpx.get(f"{base}/workers", params={"json": 1}, timeout=5).json()["data"]
            return all(any(row["hostname"].startswith(f"{n}@") for row in data) for n in names)
        # Flower only sees events sent while it listens: wait for the workers before submitting.
        _wait_for(workers_seen, "Flower to list the three workers")

        client = Client(settings)
        run_id = client.submit(small_spec("flw"))
        client.wait(run_id, timeout=60)
        episode_ids = [r["episode_id"] for r in client.results(run_id)]

        def episodes_seen():
            rows = _datatable(base, "megaflow.episode")
            return all(any(e in str(r.get("args")) for r in rows) for e in episode_ids)
        _wait_for(episodes_seen, "Flower to receive every episode's task events")

        workers_html = chromium(f"{base}/workers", dump_dom=True)
        chromium(f"{base}/workers", screenshot=ARTIFACTS / "flower-workers.png")
        for name in names:
            assert f"{name}@" in workers_html, name
        tasks_html = chromium(f"{base}/tasks?name=megaflow.episode", dump_dom=True, size="1600,1000")
        chromium(f"{base}/tasks?name=megaflow.episode", screenshot=ARTIFACTS / "flower-tasks.png", size="1600,1000")
        assert "megaflow.episode" in tasks_html
        for eid in episode_ids:
            assert eid in tasks_html, f"episode {eid} not on the tasks page"
        hops_html = chromium(f"{base}/tasks?name=megaflow.hop.generate", dump_dom=True, size="1600,1000")
        assert "megaflow.hop.generate" in hops_html
        assert any(eid in hops_html for eid in episode_ids)
        assert (ARTIFACTS / "flower-tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop(proc)


def test_flower_off_loopback_refuses_without_credentials(tmp_path):
    log = tmp_path / "flower.log"
    proc = megaflow(["flower", "--address", "0.0.0.0", "--port", str(free_port())],
                    {"MEGAFLOW_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", AUTH_ENV: ""}, log)
    try:
        assert proc.wait(30) == 2
    finally:
        stop(proc)
    out = log.read_text()
    assert "refusing to serve Flower" in out and AUTH_ENV in out


@pytest.mark.integration
def test_flower_off_loopback_asks_for_credentials(tmp_path, amqp_vhost):
    port = free_port()
    log = tmp_path / "flower.log"
    proc = megaflow(["flower", "--address", "0.0.0.0", "--port", str(port)],
                    {"MEGAFLOW_BROKER_URL": amqp_vhost, "MEGAFLOW_DATA_DIR": str(tmp_path),
                     AUTH_ENV: "ops:pa55-w0rd"}, log)
    try:
        # Requests go to loopback only; the server binds every interface.
        url = f"http://127.0.0.1:{port}/workers"
        assert wait_http(url, proc, log).status_code == 401
        assert httpx.get(url, auth=("ops", "wrong"), timeout=5).status_code == 401
        assert httpx.get(url, auth=("ops", "pa55-w0rd"), timeout=5).status_code == 200
        token = base64.b64encode(b"ops:pa55-w0rd").decode()
        assert httpx.get(url, headers={"Authorization": f"Basic {token}"}, timeout=5).status_code == 200
    finally:
        stop(proc)
    out = log.read_text()
    assert "pa55-w0rd" not in out, "the password must never be printed"
    assert "ops" in out
