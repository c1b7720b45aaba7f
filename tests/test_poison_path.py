"""The poison path ends the episode and closes the run, with real workers (issue #22.1).

Workers with ``MEGAFLOW_HOP_MAX_DELIVERIES=1``; one episode runs ``sleep 12``; its
env worker is SIGKILLed once mid-command. The redelivered exec hop is past its
limit: the episode must end ``infra_failed`` (``poison``) with the hop named, its
chord member must return, the run must close, and nothing may be dead-lettered.
(Before: the ledger recorded a result without ``hop``/``step``, the decision
raised ``KeyError('step')``, the chord's join crashed, the run stayed running.)
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from megaflow import Client
from megaflow.db.models import Episode, Event, Hop
from megaflow.local_stack import WorkerProcess

HOST = "poison-host"
ENV = {"MEGAFLOW_HOP_MAX_DELIVERIES": "1", "MEGAFLOW_WORKER_CONCURRENCY": "2"}

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host=HOST, name="poison-", env=ENV)]


def _dead_letters(app) -> int:
    with app.connection_for_write() as conn:
        return conn.default_channel.queue_declare("megaflow.dead", passive=True)[1]


def test_a_hop_past_its_delivery_limit_ends_its_episode_and_the_run_closes(cluster):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit({
        "name": "poison-exec", "sandbox": {"type": "local"},
        "model": {"type": "scripted", "replies": ["```bash\nsleep 12\n```", "```bash\nsubmit\n```"]},
        "limits": {"exec_timeout_s": 60},
        "tasks": [{"instance_id": "t", "instruction": "sleep", "check": "true"}]})
    deadline = time.monotonic() + 90
    while True:  # the command is under way
        assert time.monotonic() < deadline, f"the command never started: {client.status(run_id)}"
        with client.session() as s:
            started = s.execute(select(Hop.status).where(Hop.hop == "exec", Hop.step_index == 0)).scalar()
        if started == "started":
            break
        time.sleep(0.2)
    time.sleep(2.0)
    workers["env"].kill()
    workers["env"] = WorkerProcess("env", settings, name="poison-env2", extra_env=ENV).start()

    st = client.wait(run_id, timeout=120)
    assert st["status"] == "finished", st
    [row] = client.results(run_id)
    assert (row["state"], row["exit_status"]) == ("infra_failed", "poison"), row
    with client.session() as s:
        ep = s.execute(select(Episode).where(Episode.run_id == run_id)).scalar_one()
        poison = s.execute(select(Event.data).where(Event.kind == "task.poison")).scalars().all()
        exec_hop = s.execute(select(Hop).where(Hop.subject_id == ep.id, Hop.hop == "exec")).scalar_one()
    assert "exec hop" in ep.error and "poison" in ep.error, ep.error
    assert [p["task"] for p in poison] == ["megaflow.hop.exec"] and poison[0]["deliveries"] == 2, poison
    # The poison result is the hop's record: a later delivery replays it.
    assert exec_hop.status == "done" and exec_hop.result["exit_status"] == "poison"
    assert client.events(run_id)["run.done"] == 1
    assert _dead_letters(client.app) == 0
