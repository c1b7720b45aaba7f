"""RL batch hand-off on PostgreSQL: G at a time, woken by a group's close, exactly once, a killed consumer.

The first tests put finished rows in a fresh database (no workers: seconds); the last
runs real workers, the scripted model and RabbitMQ, and kills a consumer process
that holds a batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from test_rl_batches import _run

from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import RLHandoff, RolloutGroup, Run
from megaflow.db.schema import upgrade
from megaflow.rl.handoff import BatchStream
from megaflow.scheduler.closing import close_group, close_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

#: A consumer process: takes one batch, says which, and waits to be killed (never acknowledges).
CONSUMER = textwrap.dedent("""
    import sys, time
    from megaflow.rl.handoff import BatchStream

    class Chars:
        def turn_ids(self, history, new):
            return [1] + [ord(c) for m in new for c in m["content"]] + [3]
        def text_ids(self, text):
            return [ord(c) for c in text]

    run_id = sys.argv[2] if sys.argv[2] != "-" else sys.stdin.readline().strip()  # "-": started before the run
    stream = BatchStream(sys.argv[1], run_id, int(sys.argv[3]), tokenizer=Chars(), timeout_s=60)
    batch = next(stream)
    print(batch.batch_id, ",".join(batch.group_ids), flush=True)
    time.sleep(600)
""")


def _db(pg_url) -> str:
    upgrade(pg_url)
    return pg_url


def _groups(n: int) -> list:
    return [[(states.SUCCEEDED, 1.0, True), (states.FAILED, 0.0, True)] for _ in range(n)]


def _consumer(url: str, run_id: str | None, g: int, submit=None) -> tuple[subprocess.Popen, str, list[str]]:
    """A consumer process; given `submit` instead of a run id, it starts first and is given the run once submitted."""
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, url, run_id or "-", str(g)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if submit is not None:
        proc.stdin.write(submit() + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline().split()
    if not line:
        proc.wait(10)
        pytest.fail(f"the consumer process took no batch (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
    return proc, line[0], line[1].split(",")


def test_batches_of_g_then_a_smaller_last_one_then_the_end(pg_url):
    url = _db(pg_url)
    run_id, gids = _run(url, _groups(5))
    seen = []
    with BatchStream(url, run_id, 2, timeout_s=10) as stream:
        for batch in stream:
            assert all(len(e.input_ids) == len(e.loss_mask) == len(e.behaviour_logprobs) for e in batch.episodes)
            assert json.loads(json.dumps(batch.to_dict()))["group_ids"] == batch.group_ids
            seen.append(batch.group_ids)
            batch.ack()
            batch.ack()  # twice is once
    assert [len(g) for g in seen] == [2, 2, 1]
    assert sorted(g for b in seen for g in b) == sorted(gids)
    # Everything acknowledged: a new consumer has nothing left, and says so at once.
    assert list(BatchStream(url, run_id, 2, timeout_s=10)) == []


def test_a_group_closed_by_its_callback_wakes_a_waiting_consumer(pg_url):
    url = _db(pg_url)
    run_id, gids = _run(url, _groups(2))
    with session_scope(url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(status="running"))
        s.execute(update(RolloutGroup).where(RolloutGroup.run_id == run_id).values(status="pending"))
    with BatchStream(url, run_id, 1, timeout_s=0.3) as idle, pytest.raises(TimeoutError, match="within 0.3s"):
        next(idle)
    got, errors = [], []

    def consume():
        try:
            with BatchStream(url, run_id, 1, timeout_s=20) as stream:
                for batch in stream:
                    got.append((time.monotonic(), batch))
                    batch.ack()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(1.0)
    assert got == []  # nothing is ready: the consumer waits
    closed = time.monotonic()
    with session_scope(url) as s:
        close_group(s, gids[0])
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got, errors
    woke_s = got[0][0] - closed
    assert woke_s < 1.0, woke_s
    batch = got[0][1]
    assert batch.group_ids == [gids[0]]
    # close_group wrote the advantages the batch carries: (r - mean) / (std + eps) for rewards 1 and 0.
    assert [round(e.advantage, 3) for e in batch.episodes] == [1.0, -1.0]
    with session_scope(url) as s:
        close_group(s, gids[1])
        close_run(s, run_id)
    consumer.join(10)
    assert not consumer.is_alive() and not errors
    assert [b.group_ids for _, b in got] == [[gids[0]], [gids[1]]]


def test_a_killed_consumers_batch_goes_to_the_next_and_an_acked_one_never_again(pg_url):
    url = _db(pg_url)
    run_id, gids = _run(url, _groups(3))
    proc, batch_id, taken = _consumer(url, run_id, 2)
    got, errors = [], []

    def consume():
        try:
            with BatchStream(url, run_id, 2, timeout_s=20) as stream:
                for batch in stream:
                    got.append((time.monotonic(), batch))
                    batch.ack()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    try:
        # While it lives, its batch is its own: another consumer gets the rest, then waits.
        other = threading.Thread(target=consume)
        other.start()
        _until(lambda: got or errors)
        [(_, rest)] = got
        assert rest.batch_id != batch_id and set(rest.group_ids).isdisjoint(taken)
        time.sleep(0.5)
        assert len(got) == 1 and other.is_alive()
    finally:
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Its death wakes the waiting consumer, which takes the batch over whole, and then ends.
    other.join(15)
    assert not other.is_alive() and not errors, errors
    assert len(got) == 2
    took_over_s, batch = got[1][0] - killed, got[1][1]
    assert took_over_s < 2.0, took_over_s
    assert (batch.batch_id, batch.group_ids, batch.handouts) == (batch_id, taken, 2)
    with session_scope(url) as s:
        acked = s.execute(select(RLHandoff.group_id).where(RLHandoff.acked_at.is_not(None))).scalars().all()
    assert sorted(acked) == sorted(gids)
    # Everything acknowledged: never handed out again.
    assert list(BatchStream(url, run_id, 2, timeout_s=10)) == []


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)

class Chars:
    """A fake ChatTokenizer, for turns whose backend recorded no prompt ids (as `CONSUMER`'s)."""

    def turn_ids(self, history, new):
        return [1] + [ord(c) for m in new for c in m["content"]] + [3]

    def text_ids(self, text):
        return [ord(c) for c in text]


#: Two sandboxes at once on the one env host: the groups (2 rollouts each) run one after another.
@pytest.mark.cluster(host="rl-host", sandbox_capacity=2)
def test_a_runs_batches_arrive_while_it_runs_and_a_killed_consumers_batch_is_handed_out_again(cluster):
    client = cluster.client
    spec = {"name": "rl", "rollouts": 2, "sandbox": {"type": "memory"},
            "model": {"type": "scripted", "latency_s": 0.3,
                      "replies": ["```bash\necho hi\n```", "```bash\nsubmit\n```"]},
            "tasks": [{"instance_id": f"t{i}", "instruction": "x", "check": "true" if i % 2 else "false"}
                      for i in range(4)]}
    submitted = []

    def submit() -> str:
        submitted.append(client.submit(spec))
        return submitted[0]

    # A trainer process (started first, so its start-up is not timed) takes the first batch
    # and is killed before it acknowledges it.
    proc, batch_id, taken = _consumer(client.db_url, None, 1, submit=submit)
    [run_id] = submitted
    with client.session() as s:
        assert s.get(Run, run_id).status == "running"  # the first batch came before the run ended
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)

    batches = []
    with client.batches(run_id, groups_per_batch=1, tokenizer=Chars(), timeout_s=60) as stream:
        for batch in stream:
            batches.append(batch)
            batch.ack()
    assert (batches[0].batch_id, batches[0].group_ids, batches[0].handouts) == (batch_id, taken, 2)
    assert sorted(g for b in batches for g in b.group_ids) == sorted(_group_ids(client, run_id))
    results = {r["episode_id"]: r for r in client.results(run_id)}
    for batch in batches:
        for ep in batch.episodes:
            r = results[ep.episode_id]
            assert (ep.reward, ep.advantage, ep.exit_status) == (r["reward"], r["advantage"], "submitted")
            assert len(ep.completion_token_ids) == len(ep.prompt_token_ids) == len(ep.policy_versions) == 2
            model = [t for t, m in zip(ep.input_ids, ep.loss_mask) if m]
            assert model == [t for c in ep.completion_token_ids for t in c] and model
            lp = [x for x, m in zip(ep.behaviour_logprobs, ep.loss_mask) if m]
            assert lp == [x for c in ep.completion_logprobs for x in c]
            assert not any(x for x, m in zip(ep.behaviour_logprobs, ep.loss_mask) if not m)
    assert {e.reward for b in batches for e in b.episodes} == {0.0, 1.0}
    assert client.wait(run_id, timeout=30)["status"] == "finished"


def _group_ids(client, run_id) -> list[str]:
    with client.session() as s:
        return list(s.execute(select(RolloutGroup.id).where(RolloutGroup.run_id == run_id)).scalars())


def test_the_cli_writes_a_jsonl_file_per_batch_and_acks_only_when_asked(pg_url, tmp_path):
    from typer.testing import CliRunner

    from megaflow.cli.main import app

    url = _db(pg_url)
    run_id, gids = _run(url, _groups(3))
    env = {"MEGAFLOW_DATA_DIR": str(tmp_path), "MEGAFLOW_DATABASE_URL": url}
    peek = CliRunner().invoke(app, ["batches", run_id, "--groups", "2", "--out", str(tmp_path / "peek")], env=env)
    assert peek.exit_code == 0, peek.output
    assert "2 batches (not acknowledged)" in peek.output
    # Not acknowledged: the next consumer gets the same batches again.
    taken = CliRunner().invoke(app, ["batches", run_id, "-g", "2", "-o", str(tmp_path / "b"), "--ack"], env=env)
    assert taken.exit_code == 0, taken.output
    files = sorted((tmp_path / "b").glob("batch-*.jsonl"))
    assert [f.name[:11] for f in files] == ["batch-00001", "batch-00002"]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(lines) == 6 and sorted({e["group_id"] for e in lines}) == sorted(gids)
    assert all(len(e["input_ids"]) == len(e["loss_mask"]) and e["run_id"] == run_id for e in lines)
    assert "handed out again" in taken.output and "2 batches acknowledged" in taken.output
    again = CliRunner().invoke(app, ["batches", run_id, "-g", "2", "--ack"], env=env)
    assert again.exit_code == 0 and again.stdout == "" and "0 batches" in again.output
