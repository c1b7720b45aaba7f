"""`Client.wait` on PostgreSQL: woken by the run's end (NOTIFY), not by polling."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, update
from sqlalchemy import func as sql_func

from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import Run, new_id
from megaflow.db.schema import upgrade
from megaflow.scheduler.closing import ready_channel


def _running_run(url: str) -> str:
    with session_scope(url) as s:
        run = Run(id=new_id(), name="w", spec={}, n_episodes=0, status="running")
        s.add(run)
        return run.id


def _finish_later(url: str, run_id: str, after: float, notify: bool) -> threading.Thread:
    def finish():
        time.sleep(after)
        with session_scope(url) as s:
            s.execute(update(Run).where(Run.id == run_id).values(status="finished"))
            if notify:
                s.execute(select(sql_func.pg_notify(ready_channel(run_id), "")))

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


@pytest.mark.integration
@pytest.mark.parametrize("notify", [True, False])
def test_wait_returns_at_the_runs_notification_or_within_a_second_without_one(pg_url, notify):
    upgrade(pg_url)
    client = Client(Settings(database_url=pg_url))
    run_id = _running_run(pg_url)
    thread = _finish_later(pg_url, run_id, 0.5, notify)
    started = time.monotonic()
    assert client.wait(run_id, timeout=10)["status"] == "finished"
    elapsed = time.monotonic() - started
    thread.join()
    # Woken by the notification at once; without one, the next look (1 s) finds the end.
    assert (0.45 < elapsed < 0.8) if notify else (0.9 < elapsed < 1.6), elapsed


@pytest.mark.integration
def test_wait_times_out_naming_the_state(pg_url):
    upgrade(pg_url)
    client = Client(Settings(database_url=pg_url))
    run_id = _running_run(pg_url)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        client.wait(run_id, timeout=0.3)
    assert time.monotonic() - started < 1.0
