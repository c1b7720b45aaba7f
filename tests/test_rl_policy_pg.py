"""Policy versions and bounded staleness on real workers (issue 18, points 2 and 3).

PostgreSQL, RabbitMQ and Celery worker processes; the test plays the trainer and
publishes checkpoints while the run goes on. Every assertion counts from the rows the
workers wrote (steps, the hop ledger, policy_versions), never from the test's own counters.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from megaflow.db import states
from megaflow.db.models import Episode, Hop, PolicyVersion, RolloutGroup, Step

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="rl-host", sandbox_capacity=8)]

#: A reply that shows which version wrote it, then a command; then a reply that submits.
REPLIES = ["v{version}\n```bash\necho hi\n```", "v{version}\n```bash\nsubmit\n```"]


def checkpoint(root: Path, name: str) -> str:
    """A directory that passes the full-checkpoint check (the scripted model loads nothing)."""
    path = root / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return str(path)


def spec(groups: int, rl: dict, rollouts: int = 2, latency_s: float = 0.0) -> dict:
    return {"name": "rl-policy", "rollouts": rollouts, "sandbox": {"type": "memory"},
            "model": {"type": "scripted", "replies": REPLIES, "latency_s": latency_s},
            "tasks": [{"instance_id": f"t{i}", "instruction": "x", "check": "true"} for i in range(groups)],
            "rl": rl}


def wait_for(what, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def by_group(client, run_id) -> dict[int, list[tuple[str, str | None]]]:
    """Group index -> its episodes' (state, wait reason)."""
    with client.session() as s:
        rows = s.execute(select(RolloutGroup.index, Episode.state, Episode.wait_reason)
                         .join(Episode, Episode.group_id == RolloutGroup.id).where(Episode.run_id == run_id)).all()
    out: dict[int, list] = {}
    for index, state, why in rows:
        out.setdefault(index, []).append((state, why))
    return out


def turns(client, run_id) -> list[tuple[int, int | None, str]]:
    """(group index, recorded policy version, completion) of every turn of the run."""
    with client.session() as s:
        return s.execute(select(RolloutGroup.index, Step.policy_version, Step.completion)
                         .join(Episode, Episode.group_id == RolloutGroup.id)
                         .join(Step, Step.episode_id == Episode.id).where(Episode.run_id == run_id)).all()


def test_sync_pauses_at_each_batch_then_async_k1_stays_within_one_version(cluster, tmp_path):
    """Two runs on one cluster (a cluster costs ~30 s to start and stop): sync, then async with k = 1."""
    sync_pauses_at_each_batch_and_later_turns_carry_the_published_version(cluster.client, tmp_path)
    async_k1_never_samples_a_turn_more_than_one_version_behind(cluster.client, tmp_path)


def sync_pauses_at_each_batch_and_later_turns_carry_the_published_version(client, tmp_path):
    started = time.monotonic()
    run_id = client.submit(spec(3, {"policy": "sync", "mode": "sync", "groups_per_batch": 1}))

    for version in (1, 2):
        # Batch `version - 1` runs to its end; the next waits for the trainer, holding no worker.
        def paused(v=version):
            g = by_group(client, run_id)
            done = all(st in states.TERMINAL for st, _ in g[v - 1])
            return done and all(st == states.WAITING and why == f"policy sync: waiting for version {v}"
                                for st, why in g[v])
        wait_for(f"batch {version - 1} done and batch {version} held", paused)
        assert {v for gi, v, _ in turns(client, run_id) if gi >= version} == set()  # nothing sampled past it
        assert client.publish_policy(checkpoint(tmp_path, f"v{version}"), run_id=run_id) == version

    assert client.wait(run_id, timeout=60)["status"] == "finished"
    rows = turns(client, run_id)
    assert len(rows) == 3 * 2 * 2
    for group, version, text in rows:
        # Earlier turns carry the earlier version, later ones the new one; and the words of a reply
        # come from the version recorded with it (no request saw a half-switched model).
        assert version == group, (group, version, text)
        assert text.startswith(f"v{version}\n")
    print(f"sync run with two publications: {time.monotonic() - started:.1f}s")


def async_k1_never_samples_a_turn_more_than_one_version_behind(client, tmp_path):
    started = time.monotonic()
    groups = 6
    run_id = client.submit(spec(groups, {"policy": "async", "mode": "async", "max_staleness": 1,
                                         "groups_per_batch": 1}, rollouts=1, latency_s=0.05))
    published: list[int] = []

    def trainer():
        # A trainer taking each finished group as a batch and publishing a new version after it.
        for n in range(1, groups):
            def finished(n=n):
                with client.session() as s:
                    return s.execute(select(func.count()).select_from(RolloutGroup).where(
                        RolloutGroup.run_id == run_id, RolloutGroup.status == "finished")).scalar() >= n
            wait_for(f"{n} groups finished", finished, timeout=60)
            published.append(client.publish_policy(checkpoint(tmp_path, f"a{n}"), run_id=run_id))

    thread = threading.Thread(target=trainer)
    thread.start()
    thread.join(180)
    assert client.wait(run_id, timeout=60)["status"] == "finished"
    assert published == list(range(1, groups))

    with client.session() as s:
        made = dict(s.execute(select(PolicyVersion.version, PolicyVersion.created_at)
                              .where(PolicyVersion.policy == "async")).all())
        rows = s.execute(select(RolloutGroup.index, Step.policy_version, Hop.finished_at, Hop.duration_s)
                         .join(Episode, Episode.group_id == RolloutGroup.id)
                         .join(Step, Step.episode_id == Episode.id)
                         .join(Hop, (Hop.subject_id == Step.episode_id) & (Hop.step_index == Step.index)
                               & (Hop.hop == "generate"))
                         .where(Episode.run_id == run_id)).all()
    assert len(rows) == groups * 2
    for group, version, finished_at, duration_s in rows:
        sampled_at = finished_at - dt.timedelta(seconds=duration_s or 0)
        newest = max([v for v, at in made.items() if at <= sampled_at], default=0)
        assert newest - version <= 1, (group, version, newest)
        # Admission: group g (batch g) starts only once version g - 1 is out.
        assert version >= group - 1, (group, version)
    assert max(v for _, v, _, _ in rows) >= 3  # the run did follow the trainer
    print(f"async k=1 run with {len(published)} publications: {time.monotonic() - started:.1f}s")


@pytest.fixture
def pg_client(pg_url, tmp_path):
    """A client on a fresh PostgreSQL database, no workers (publishing needs none)."""
    from megaflow import Client, Settings
    from megaflow.db.schema import upgrade

    upgrade(pg_url)
    return Client(Settings(data_dir=tmp_path, database_url=pg_url))


def test_publish_refuses_a_bad_checkpoint_and_records_nothing(pg_client, tmp_path):
    client = pg_client
    from megaflow.model.policy import PolicyError

    with pytest.raises(PolicyError, match="not a PEFT LoRA adapter"):
        client.publish_policy(checkpoint(tmp_path, "full"), kind="lora")
    with pytest.raises(PolicyError, match="does not exist"):
        client.publish_policy(tmp_path / "missing")
    with client.session() as s:
        assert s.execute(select(func.count()).select_from(PolicyVersion)).scalar() == 0


def test_concurrent_publishers_on_postgresql_get_distinct_versions(pg_client, tmp_path):
    path = checkpoint(tmp_path, "c")
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.extend(pg_client.publish_policy(path) for _ in range(5)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))


def test_a_listening_worker_hears_each_publication_at_commit(pg_client, pg_url, tmp_path):
    """The push that switches model workers: LISTEN on the channel publishers NOTIFY (no polling)."""
    import queue

    from megaflow.model.policy import Listener

    heard: queue.Queue = queue.Queue()
    listener = Listener(pg_url, heard.put).start()
    try:
        assert listener.ready.wait(10)
        path = checkpoint(tmp_path, "n")
        for expected in (1, 2):
            assert pg_client.publish_policy(path, policy="p") == expected
            ref = heard.get(timeout=10)
            assert (ref.policy, ref.version, ref.path, ref.kind) == ("p", expected, path, "full")
    finally:
        listener.stop()
