"""Scaling a pool on one host with the plain commands: `megaflow worker POOL`, started twice.

Two agent workers and two env workers on one host share a run; both of each did work
(counted by the workers themselves, through Celery's remote control, not by our ledger).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def start_worker(pool: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "megaflow", "worker", pool, "-c", "4", "--loglevel", "WARNING"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_agent_and_two_env_workers_on_one_host_share_a_run(tmp_path, pg_url, amqp_vhost):
    from megaflow import Client, Settings
    from megaflow.db.schema import upgrade

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    upgrade(pg_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
    env.update(MEGAFLOW_DATABASE_URL=pg_url, MEGAFLOW_BROKER_URL=amqp_vhost, MEGAFLOW_HOST="scale-host",
               MEGAFLOW_DATA_DIR=str(tmp_path))
    pools = ["model", "agent", "agent", "env", "env"]
    procs = [start_worker(p, env, tmp_path / f"{p}-{i}.log") for i, p in enumerate(pools)]
    try:
        settings = Settings(database_url=pg_url, broker_url=amqp_vhost, data_dir=tmp_path, host="scale-host")
        client = Client(settings)
        # Commands that take a moment, so that work piles up and both workers of a pool take some.
        tasks = [{"instance_id": f"t{i}", "instruction": "write done", "check": "test -f done",
                  "solution": ["sleep 0.3; touch done"]} for i in range(16)]
        run_id = client.submit({"name": "scale", "agent": {"type": "oracle"}, "sandbox": {"type": "local"},
                                "tasks": tasks})
        status = client.wait(run_id, timeout=240)
        assert status["by_state"] == {"succeeded": 16}, status
        assert all(p.poll() is None for p in procs), "a worker of a pool exited (node name clash?)"
        stats = {}
        for _ in range(10):  # replies come from whoever answers within the timeout
            stats.update(client.app.control.inspect(timeout=2.0).stats() or {})
            if len(stats) == len(pools):
                break
            time.sleep(1)
        done = {node: sum(s["total"].values()) for node, s in stats.items()}
        for pool in ("agent", "env"):
            nodes = [n for n in done if n.startswith(f"{pool}-")]
            assert len(nodes) == 2 and all(done[n] > 0 for n in nodes), done
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
