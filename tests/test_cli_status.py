"""No silent stall, and a readable status: the live view names stuck states and the last error; a hop's
retry is recorded with its error; `megaflow status` prints a table, `--json` one object."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.exceptions import Retry
from conftest import run_megaflow
from rich.console import Console
from typer.testing import CliRunner

from megaflow import Client, RunSpec, Settings
from megaflow.cli.main import app
from megaflow.cli.progress import Stall, follow, last_error, last_log_warning
from megaflow.cli.runs import status_table
from megaflow.db.engine import session_scope
from megaflow.db.models import Event
from megaflow.db.schema import upgrade
from megaflow.errors import SandboxError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def embedded(tmp_path):
    """Embedded settings on a fresh data directory, and one submitted run of the hello example (no workers)."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    upgrade(settings.resolved_database_url())
    client = Client(settings)
    return settings, client, client.submit(RunSpec.load(ROOT / "examples" / "hello.yaml"))


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, force_terminal=False), out


def test_a_stalled_run_says_what_is_stuck_and_the_last_error(embedded):
    settings, client, run_id = embedded
    with client.session() as s:
        s.add(Event(run_id=run_id, subject_id=None, kind="hop.retry",
                    data={"task": "megaflow.provision", "error": "SandboxError: local sandbox needs bwrap"}))
    console, out = _console()
    with pytest.raises(TimeoutError, match=f"run {run_id} still running after 1.5s"):
        follow(client, run_id, console, timeout=1.5, poll=0.05, stall_after=0.3, log_every=0.2)
    text = out.getvalue()
    assert "no progress for" in text
    assert "stuck pending=6; last error: hop.retry: SandboxError: local sandbox needs bwrap" in text


def test_a_stall_with_no_recorded_error_points_at_the_worker_logs(embedded, tmp_path):
    settings, client, run_id = embedded
    with client.session() as s:
        assert last_error(s, run_id) is None
    quiet, noisy = tmp_path / "agent.log", tmp_path / "env.log"
    quiet.write_text("[2026-01-01 00:00:00,000: INFO/MainProcess] ready\n")
    noisy.write_text("[2026-01-01 00:00:01,000: WARNING/MainProcess] megaflow.provision retried (e1): "
                     "SandboxError: boom\nplain line\n")
    console, out = _console()
    with pytest.raises(TimeoutError):
        follow(client, run_id, console, timeout=1.0, poll=0.05, stall_after=0.2, log_every=0.2,
               logs=[quiet, noisy])
    assert "last error: env.log: [2026-01-01 00:00:01,000: WARNING/MainProcess] megaflow.provision retried" \
        in out.getvalue()
    assert last_log_warning([quiet]) is None
    assert "MEGAFLOW_LOG_LEVEL=INFO" in Stall(40, {"provisioning": 6}, None).line()


def test_a_retried_hop_is_recorded_with_its_error(embedded):
    from workers.common import _record_retries

    settings, client, run_id = embedded
    app = client.app
    _record_retries(app)
    episode_id = client.results(run_id)[0]["episode_id"]
    task = type("Task", (), {"app": app, "name": "megaflow.provision"})()  # a sender must be hashable
    request = SimpleNamespace(args=[episode_id, 0], retries=2)
    from celery import signals

    signals.task_retry.send(sender=task, request=request,
                            reason=Retry(exc=SandboxError("local sandbox needs bwrap"), when=1))
    with session_scope(settings.resolved_database_url()) as s:
        assert last_error(s, run_id) == "hop.retry: SandboxError: local sandbox needs bwrap"
        event = s.query(Event).filter(Event.kind == "hop.retry").one()
        assert event.subject_id == episode_id and event.data["retries"] == 2


def test_status_prints_a_table_and_json(embedded):
    settings, client, run_id = embedded
    proc = run_megaflow(["status", run_id], settings.data_dir, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "{" not in proc.stdout, "a table, not a Python dict"
    assert f"run {run_id} · hello · running" in proc.stdout
    assert "pending" in proc.stdout and "total" in proc.stdout and "steps" in proc.stdout
    # The real entry point once (above); the rest in process: the same code without an interpreter start.
    env = {"MEGAFLOW_DATA_DIR": str(settings.data_dir)}
    result = CliRunner().invoke(app, ["status", run_id, "--json"], env=env)
    assert result.exit_code == 0, result.output
    st = json.loads(result.stdout)
    assert st["run_id"] == run_id and st["by_state"] == {"pending": 6} and st["episodes"] == 6
    # An unknown run id: one line, exit status 2, from every command that takes one; nothing changed.
    for command in (["status", "nosuchrun"], ["results", "nosuchrun"], ["cancel", "nosuchrun"]):
        result = CliRunner().invoke(app, command, env=env)
        assert (result.exit_code, result.stdout.strip()) == (2, "no run nosuchrun"), (command, result.output)
    result = CliRunner().invoke(app, ["cancel", run_id, "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.stdout) == {"pending": 6, "waiting": 0}, result.output
    assert client.status(run_id)["by_state"] == {"cancelled": 6}


def test_status_table_rows():
    console, out = _console()
    console.print(status_table({"run_id": "r1", "name": "n", "status": "finished", "episodes": 3,
                                "by_state": {"succeeded": 2, "infra_failed": 1}, "steps": 9, "mean_reward": 0.5,
                                "waiting": {}, "summary": {"solved": 2, "mean_reward": 0.5}}))
    text = out.getvalue()
    for row in ("succeeded", "infra_failed", "total", "solved", "0.500"):
        assert row in text
    assert text.index("succeeded") < text.index("infra_failed")
