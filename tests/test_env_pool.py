"""Persistent sandboxes through the real pipeline: reused across runs, reset between episodes.

Real RabbitMQ, PostgreSQL and Celery workers with the local backend; skips without
them, fails under CI=true.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import need
from sqlalchemy import select

from megaflow import Client
from megaflow.db.models import Episode, SandboxRow

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="pool-host")]

#: Each episode appends two lines; the check fails if a reused sandbox kept the last episode's file.
SCRIPT = ["```bash\necho {step} >> trace.txt\n```", "```bash\necho {step} >> trace.txt\n```", "```bash\nsubmit\n```"]


def spec(n: int, pool_size: int = 2) -> dict:
    return {
        "name": "pool",
        "model": {"type": "scripted", "replies": SCRIPT},
        "sandbox": {"type": "local", "mode": "persistent", "pool_size": pool_size},
        "tasks": [{"instance_id": f"t{i}", "instruction": "append two lines",
                   "check": "test $(cat trace.txt | wc -l) -eq 2"} for i in range(n)],
    }


def sandbox_ids(client: Client, run_id: str) -> list[str]:
    with client.session() as s:
        return list(s.execute(select(Episode.sandbox_id).where(Episode.run_id == run_id)).scalars())


def rows_by_state(client: Client) -> dict[str, set[str]]:
    by: dict[str, set[str]] = {}
    with client.session() as s:
        for row in s.execute(select(SandboxRow)).scalars():
            by.setdefault(row.state, set()).add(row.id)
    return by


def test_persistent_sandboxes_are_reset_and_reused(cluster, tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    first = client.submit(spec(4))
    assert client.wait(first, timeout=120)["by_state"] == {"succeeded": 4}
    idle = rows_by_state(client).get("idle", set())
    assert len(idle) == 2, "the pool keeps pool_size sandboxes; the others are destroyed"
    assert len(rows_by_state(client)["destroyed"]) == len(set(sandbox_ids(client, first))) - 2

    # One episode at a time: each takes an idle sandbox, the reset one the last left.
    for _ in range(3):
        run_id = client.submit(spec(1))
        assert client.wait(run_id, timeout=60)["by_state"] == {"succeeded": 1}, "a reused sandbox was not reset"
        assert set(sandbox_ids(client, run_id)) <= idle
    assert rows_by_state(client)["idle"] == idle

    # A worker that stops gracefully destroys its idle sandboxes.
    workers["env"].stop()
    assert "idle" not in rows_by_state(client)
    assert [p for p in (tmp_path / "sandboxes").iterdir() if p.name.startswith("mf-")] == []
