"""The README's main job: `megaflow run examples/hello.yaml` with no server at all."""

from __future__ import annotations

import shutil

import pytest
from conftest import need, run_megaflow


@pytest.mark.integration
def test_megaflow_run_on_embedded_defaults(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    proc = run_megaflow(["run", "examples/hello.yaml", "--timeout", "240"], tmp_path / "data", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("succeeded") >= 6
    summary = " ".join(out.split())  # the terminal may wrap the line
    assert "summary: 6 episodes (6 succeeded)" in summary and "solved 6" in summary, out[-2000:]
    assert (tmp_path / "data" / "megaflow.sqlite").exists()
    assert (tmp_path / "data" / "broker.sqlite").exists()


def _events(client, run_id: str) -> list[str]:
    from sqlalchemy import select

    from megaflow.db.models import Event

    with client.session() as s:
        return list(s.execute(select(Event.kind).where(Event.run_id == run_id)).scalars())


@pytest.mark.integration
def test_waits_rate_limits_and_chord_bodies_arrive_on_the_embedded_transport(tmp_path):
    """Every message the pipeline re-sends for later — admission's re-sent waiters, rate-limit
    countdowns, group and run chord bodies — arrives on the SQLite transport (the stock one dropped
    any publish on a connection that had not declared its queue)."""
    from megaflow import Client, Settings
    from megaflow.local_stack import LocalStack

    # One sandbox at a time: five of six episodes wait and are re-sent when one ends.
    settings = Settings(data_dir=tmp_path / "data", sandbox_capacity=1)
    spec = {"name": "embedded-waits", "rollouts": 3,
            "model": {"type": "scripted", "replies": ["```bash\necho {step} > out.txt\n```", "```bash\nsubmit\n```"]},
            "model_limits": {"requests_per_s": 4.0, "burst_s": 0.5},  # 12 calls: about three seconds of waits
            "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": f"t{i}", "instruction": "x", "check": "cat out.txt"} for i in range(2)]}
    with LocalStack(settings):
        client = Client(settings)
        run_id = client.submit(spec)
        st = client.wait(run_id, timeout=180)
    assert st["by_state"] == {"succeeded": 6}, st
    kinds = _events(client, run_id)
    assert kinds.count("episode.waiting") >= 4, kinds
    assert "run.done" in kinds and kinds.count("group.done") == 2, kinds


def _taken(broker_url: str, queue: str) -> int:
    """Messages of `queue` a consumer took and has not acknowledged, read from the broker's own table."""
    from sqlalchemy import create_engine, text

    engine = create_engine(broker_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                                     "WHERE q.name = :q AND NOT m.visible"), {"q": queue}).scalar()
    finally:
        engine.dispose()


@pytest.mark.integration
def test_a_message_held_by_a_killed_worker_is_delivered_by_the_next_stack(tmp_path):
    """RabbitMQ redelivers what a dead consumer held; the embedded transport does it when the next stack
    starts on the same data directory (the stock transport hid such a message for good)."""
    import shutil
    import signal
    import time

    from megaflow import Client, Settings
    from megaflow.local_stack import LocalStack

    need("bubblewrap", shutil.which("bwrap") is not None)
    settings = Settings(data_dir=tmp_path / "data")
    spec = {"name": "embedded-redelivery", "rollouts": 2,
            "model": {"type": "scripted", "latency_s": 4.0, "replies": ["```bash\nsubmit\n```"]},
            "sandbox": {"type": "local"},  # on disk: it outlives the stack (a memory sandbox dies with it)
            "tasks": [{"instance_id": "t", "instruction": "x", "check": "true"}]}
    first = LocalStack(settings).start()
    try:
        client = Client(settings)
        run_id = client.submit(spec)
        deadline = time.monotonic() + 60
        while _taken(settings.resolved_broker_url(), "model") == 0:
            assert time.monotonic() < deadline, "the model worker never took a call"
            time.sleep(0.1)
        [model] = [w for w in first.workers if w.pool == "model"]
        model.kill(signal.SIGKILL)  # dies holding a model call
    finally:
        first.stop()
    assert client.status(run_id)["by_state"] != {"succeeded": 2}
    with LocalStack(settings) as second:
        assert second.restored >= 1
        st = client.wait(run_id, timeout=120)
    assert st["by_state"] == {"succeeded": 2}, (st, client.results(run_id))
