"""`megaflow flower` against real workers, seen through a real headless Chromium."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from contextlib import contextmanager

import httpx
import pytest
from browser import ARTIFACTS, chromium, chromium_binary, free_port, megaflow, stop, wait_http
from conftest import CI, need, port_open

from megaflow import Client
from megaflow.local_stack import settings_env
from megaflow.contract import Next
from megaflow.hops.routing import label, next_signature
from megaflow.ops.flower import AUTH_ENV, FlowerAuthError, broker_api, check_auth, install_views, is_loopback
from queues.topology import DEAD_QUEUE

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


@contextmanager
def flower_watching(cluster, tmp_path):
    """`megaflow flower` on `cluster`, up and listing its workers; yields (base URL, log path); stopped after."""
    port = free_port()
    log = tmp_path / "flower.log"
    proc = megaflow(["flower", "--port", str(port)], settings_env(cluster.settings), log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(f"{base}/healthcheck", proc, log).status_code == 200
        names = [w.name for w in cluster.workers.values()]

        def workers_seen():
            data = httpx.get(f"{base}/workers", params={"json": 1}, timeout=5).json()["data"]
            return all(any(row["hostname"].startswith(f"{n}@") for row in data) for n in names)
        # Flower only sees events sent while it listens: wait for the workers before submitting.
        _wait_for(workers_seen, "Flower to list the three workers")
        yield base, log
    finally:
        stop(proc)


def _datatable(base: str, search: str = "") -> list[dict]:
    params = {"draw": 1, "start": 0, "length": 500, "search[value]": search,
              "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "received"}
    return httpx.get(f"{base}/tasks/datatable", params=params, timeout=5).json()["data"]


@pytest.mark.integration
# Three pools started with -E (task events), as `megaflow worker` starts them.
@pytest.mark.cluster(host="flower-host", name="flw-", env={"MEGAFLOW_WORKER_CONCURRENCY": "2"}, extra_args=["-E"])
def test_flower_shows_workers_and_the_runs_tasks(cluster, tmp_path):
    need("chromium", chromium_binary() is not None, "apt-get install chromium")
    names = [w.name for w in cluster.workers.values()]
    with flower_watching(cluster, tmp_path) as (base, _log):
        client = Client(cluster.settings)
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


def test_broker_api_is_derived_from_the_broker_url():
    assert broker_api("amqp://guest:guest@127.0.0.1:5672//") == "http://guest:guest@127.0.0.1:15672/api/"
    assert broker_api("amqp://mf:p%40ss@rabbitmq:5672/megaflow") == "http://mf:p%40ss@rabbitmq:15672/api/"
    assert broker_api("amqps://u:p@h/v") == "https://u:p@h:15671/api/"
    assert broker_api("sqlite:///broker.sqlite") is None and broker_api(None) is None


def test_hop_messages_carry_a_readable_label():
    from megaflow.app import make_app
    from megaflow.config import Settings

    app = make_app(Settings(broker_url="memory://"))
    hop, then = next_signature(app, "e1", Next(hop="exec", step=3), run_id="r1").tasks
    assert hop.options["argsrepr"] == "run=r1 episode=e1 step=3 hop=exec" == label("r1", "e1", 3, "exec")
    assert then.options["argsrepr"] == "run=r1 episode=e1 step=3 after=exec"
    message = app.amqp.create_task_message("t1", hop.task, hop.args, {}, argsrepr=hop.options["argsrepr"])
    assert message.headers["argsrepr"] == "run=r1 episode=e1 step=3 hop=exec"


def _replay(*events):
    """Flower's task state after `events` ((type, timestamp) of one task), as `megaflow flower` keeps it."""
    from flower import events as flower_events

    install_views()
    state = flower_events.EventsState()
    for i, (kind, ts) in enumerate(events):
        state.event({"type": kind, "uuid": "u1", "hostname": "agent-1@h", "timestamp": ts, "clock": i,
                     "local_received": ts, "name": "megaflow.episode", "args": "run=r episode=e"})
    return state.tasks["u1"].state


def test_an_episode_that_ended_failed_stays_failed_in_flower():
    # Stock Celery: SUCCESS wins in either order. The episode's last decision sends task-failed
    # and returns (its chord needs the summary), so the worker's task-succeeded follows.
    start = [("task-received", 1.0), ("task-started", 1.1)]
    assert _replay(*start, ("task-failed", 1.2), ("task-succeeded", 1.3)) == "FAILURE"
    assert _replay(*start, ("task-succeeded", 1.3), ("task-failed", 1.2)) == "FAILURE"
    assert _replay(*start, ("task-succeeded", 1.3)) == "SUCCESS"
    # The same task id runs again (every decision of an episode keeps it): an old failure is history.
    assert _replay(*start, ("task-failed", 1.2), ("task-received", 2.0), ("task-started", 2.1),
                   ("task-succeeded", 2.2)) == "SUCCESS"


def management_api() -> None:
    """RabbitMQ's management API on 127.0.0.1:15672; under CI=true, as root, enable its plugin."""
    ctl = shutil.which("rabbitmq-plugins")
    if not port_open("127.0.0.1", 15672) and CI and ctl and os.geteuid() == 0:
        subprocess.run([ctl, "enable", "rabbitmq_management"], capture_output=True, timeout=120, check=False)
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", 15672) and time.monotonic() < deadline:
            time.sleep(0.5)
    need("rabbitmq management API", port_open("127.0.0.1", 15672), "rabbitmq-plugins enable rabbitmq_management")


@pytest.mark.integration
@pytest.mark.cluster(host="flower-fail", name="flf-", env={"MEGAFLOW_WORKER_CONCURRENCY": "2"}, extra_args=["-E"])
def test_flower_shows_failed_episodes_their_run_and_the_dead_letter_queue(cluster, tmp_path):
    need("chromium", chromium_binary() is not None, "apt-get install chromium")
    management_api()
    settings = cluster.settings
    with flower_watching(cluster, tmp_path) as (base, log):

        client = Client(settings)
        # Known failures: the agent never submits within one step (failed); setup breaks (infra_failed).
        run_id = client.submit({
            "name": "flf", "model": {"type": "scripted", "replies": ["```bash\nexit 1\n```"]},
            "sandbox": {"type": "local"}, "limits": {"max_steps": 1, "provision_timeout_s": 30}, "rollouts": 1,
            "tasks": [{"instance_id": "agent-fails", "instruction": "x", "check": "true"},
                      {"instance_id": "setup-breaks", "instruction": "x", "check": "true", "setup": ["exit 3"]}]})
        # The chord joined: the run closed with both summaries.
        st = client.wait(run_id, timeout=120)
        assert st["by_state"] == {"failed": 1, "infra_failed": 1}, st
        failed = {r["episode_id"]: r["state"] for r in client.results(run_id)}

        def failures_seen():
            rows = _datatable(base, "state:FAILURE")
            return [r for r in rows if r["name"] == "megaflow.episode"
                    and any(f"episode={e}" in str(r["args"]) for e in failed)]
        rows = _wait_for(lambda: len(failures_seen()) == 2 and failures_seen(), "both failed episodes as FAILURE")
        assert all(f"run={run_id}" in r["args"] for r in rows), rows
        assert {r["exception"] for r in rows} >= {"episode ended failed (step_limit)"}, rows
        # Flower's search finds the run's hops by the run id in their readable arguments.
        hops = _datatable(base, f"run={run_id}")
        assert {"megaflow.hop.provision", "megaflow.episode"} <= {r["name"] for r in hops}, hops
        cards = httpx.get(f"{base}/workers", params={"json": 1}, timeout=5).json()["data"]
        assert sum(row.get("task-failed") or 0 for row in cards) >= 2, cards

        failed_html = chromium(f"{base}/tasks?state=FAILURE", dump_dom=True, size="1600,1000")
        chromium(f"{base}/tasks?state=FAILURE", screenshot=ARTIFACTS / "flower-failed.png", size="1600,1000")
        for eid in failed:
            assert f"episode={eid}" in failed_html, f"episode {eid} not in Flower's failed view"
        assert f"run={run_id}" in failed_html

        # The management API has counts for a new vhost's queues after its first stats tick (5 s).
        vhost = settings.broker_url.rsplit("/", 1)[1]

        def dead_queue_counted():
            r = httpx.get(f"http://127.0.0.1:15672/api/queues/{vhost}/{DEAD_QUEUE}", auth=("guest", "guest"),
                          timeout=5)
            return r.status_code == 200 and "messages" in r.json()
        _wait_for(dead_queue_counted, "the management API to count megaflow.dead", timeout=30, every=1)
        broker_html = chromium(f"{base}/broker", dump_dom=True, size="1600,1000")
        chromium(f"{base}/broker", screenshot=ARTIFACTS / "flower-broker.png", size="1600,1000")
        assert "No queue data" not in broker_html
        for queue in (DEAD_QUEUE, "agent", "model"):
            assert queue in broker_html, f"{queue} not on Flower's Broker tab"
    assert "guest:guest" not in log.read_text(), "the management API's credentials must never be printed"


def test_compose_gives_flower_the_management_api():
    import yaml

    from browser import ROOT

    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert "rabbitmq-plugins enable --offline rabbitmq_management" in " ".join(services["rabbitmq"]["command"])
    assert "127.0.0.1:15672:15672" in services["rabbitmq"]["ports"]
    api = services["flower"]["environment"]["MEGAFLOW_FLOWER_BROKER_API"]
    assert api.endswith(":15672/api/}") and "${RABBITMQ_PASSWORD}" in api
