"""Queue wait: the publish stamp travels with every message and the ledger keeps the wait."""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace

from megaflow.db import ledger
from megaflow.db.engine import session_scope
from megaflow.db.models import Hop
from megaflow.hops.queue_wait import HEADER, queue_wait, stamp


def test_wait_is_start_minus_publish_clamped_at_zero():
    assert queue_wait(SimpleNamespace(**{HEADER: 100.0}), now=102.5) == 2.5
    # A worker clock behind the publisher's (skew between hosts): never a negative wait.
    assert queue_wait(SimpleNamespace(**{HEADER: 100.0}), now=99.0) == 0.0
    assert queue_wait(SimpleNamespace(), now=1.0) is None  # a direct call: no message, no stamp
    assert queue_wait(SimpleNamespace(**{HEADER: "junk"}), now=1.0) is None


def test_a_delayed_message_waits_from_its_due_time():
    due = dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=dt.UTC)
    request = SimpleNamespace(**{HEADER: due.timestamp() - 10}, eta=due.isoformat())
    assert queue_wait(request, now=due.timestamp() + 1) == 1.0


def test_stamp_writes_the_header():
    headers: dict = {}
    before = time.time()
    stamp(sender="megaflow.episode", headers=headers, body=())
    assert before <= headers[HEADER] <= time.time()


def test_ledger_keeps_queue_wait_beside_work_time(sqlite_url):
    with session_scope(sqlite_url) as s:
        assert ledger.record(s, "e1", 0, "agent.start", "t1", {}, duration_s=0.01, queued_s=0.5)
        assert ledger.claim(s, "e1", 0, "exec", "t2").status == ledger.NEW
        assert ledger.finish(s, "e1", 0, "exec", {}, 0.2, task_id="t2", queued_s=1.5)
    with session_scope(sqlite_url) as s:
        rows = {h.hop: (h.queued_s, h.duration_s) for h in s.query(Hop)}
    assert rows == {"agent.start": (0.5, 0.01), "exec": (1.5, 0.2)}


def test_a_worker_reads_the_stamp_of_a_published_message(tmp_path):
    """Through the embedded broker and a real (solo) worker: the header reaches ``task.request``."""
    from celery.contrib.testing.worker import start_worker

    from megaflow.app import make_app
    from megaflow.config import Settings
    from megaflow.db.schema import upgrade

    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url())
    app = make_app(settings)

    @app.task(bind=True, name="tests.queue_wait", ignore_result=False)
    def waited(self):
        return queue_wait(self.request)

    result = waited.apply_async()
    time.sleep(0.5)  # the message sits in its queue before any worker starts
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["agent"]):
        wait = result.get(timeout=30)
    assert 0.5 <= wait < 30


def test_scale_reports_queue_wait_by_littles_law(sqlite_url, tmp_path):
    from megaflow.config import Settings
    from megaflow.db.models import utcnow
    from megaflow.scheduler.scale import report

    with session_scope(sqlite_url) as s:
        for i in range(20):  # 20 model calls in the last 100 s, each waited 2 s and worked 1 s
            s.add(Hop(subject_id=f"e{i}", step_index=0, hop="generate", task_id="t", status="done",
                      finished_at=utcnow(), duration_s=1.0, queued_s=2.0))
        s.add(Hop(subject_id="e0", step_index=1, hop="exec", task_id="t", status="done", finished_at=utcnow(),
                  duration_s=1.0))  # recorded without a stamp: no wait, not counted as zero
    out = report(Settings(data_dir=tmp_path, database_url=sqlite_url), None, window_s=100.0)
    model, env = out["pools"]["model"], out["pools"]["env"]
    assert model["queued_s_per_hop"] == 2.0 and model["queued"] == 0.4  # 0.2 hops/s x 2 s
    assert env["queued_s_per_hop"] == 0.0 and env["queued"] == 0.0
