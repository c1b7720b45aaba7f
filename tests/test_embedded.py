"""The README's main job: `megaflow run examples/hello.yaml` with no server at all."""

from __future__ import annotations

import shutil

from conftest import need, run_megaflow


def test_megaflow_run_on_embedded_defaults(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    proc = run_megaflow(["run", "examples/hello.yaml", "--timeout", "240"], tmp_path / "data", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("succeeded") >= 6
    assert '"episodes": 6' in out and '"solved": 6' in out
    assert (tmp_path / "data" / "megaflow.sqlite").exists()
    assert (tmp_path / "data" / "broker.sqlite").exists()


def _events(client, run_id: str) -> list[str]:
    from sqlalchemy import select

    from megaflow.db.models import Event

    with client.session() as s:
        return list(s.execute(select(Event.kind).where(Event.run_id == run_id)).scalars())


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
