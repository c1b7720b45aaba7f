"""Run statistics follow one rule everywhere: the run's summary, `Client.status` and the report (SQLite, fast)."""

from __future__ import annotations

import pytest

from megaflow import Client, Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, RolloutGroup, Run, TaskInstance
from megaflow.db.run_stats import run_stats, summarize
from megaflow.scheduler.closing import run_summary
from megaflow.ops import stats as ops_stats
from megaflow.ops.report import render_html

#: (state, reward, superseded) per episode of the hand-made run.
EPISODES = [
    ("succeeded", 1.0, False), ("succeeded", 1.0, False), ("succeeded", 0.5, False),
    ("failed", 0.0, False),
    ("failed", None, False),  # finished without a reward: counts 0.0
    ("infra_failed", None, False), ("infra_failed", None, False),  # no reward, not in the mean
    ("cancelled", None, False), ("running", None, False),  # not finished: not in the mean
    ("infra_failed", None, True), ("failed", 0.0, True),  # attempts `resume` replaced: history
]
#: The rule applied by hand: (1 + 1 + 0.5 + 0 + 0) / 5 finished episodes.
MEAN = 2.5 / 5


def test_the_rule():
    stats = summarize((state, reward) for state, reward, old in EPISODES if not old)
    assert stats.episodes == 9
    assert stats.by_state == {"succeeded": 3, "failed": 2, "infra_failed": 2, "cancelled": 1, "running": 1}
    assert stats.rewards == (1.0, 1.0, 0.5, 0.0, 0.0)
    assert stats.mean_reward == pytest.approx(MEAN)
    assert stats.solved == 2


def test_no_finished_episode_has_no_mean():
    assert summarize([("infra_failed", None), ("running", None)]).mean_reward is None
    assert summarize([]).summary() == {"episodes": 0, "by_state": {}, "mean_reward": None, "solved": 0}


@pytest.fixture
def run(sqlite_url) -> tuple[str, str]:
    with session_scope(sqlite_url) as s:
        s.add(Run(id="r1", name="stats", spec={}, n_episodes=len(EPISODES), status="running"))
        s.add(TaskInstance(id="t1", run_id="r1", instance_id="task-1", kind="terminal", data={}))
        s.flush()
        s.add(RolloutGroup(id="g1", run_id="r1", task_instance_id="t1", index=0, size=len(EPISODES)))
        s.flush()
        for i, (state, reward, old) in enumerate(EPISODES):
            s.add(Episode(id=f"e{i}", seq=i, run_id="r1", group_id="g1", task_instance_id="t1", sample_index=i,
                          state=state, reward=reward, superseded_by="e0" if old else None))
    return sqlite_url, "r1"


def test_every_view_agrees(run, tmp_path):
    url, run_id = run
    with session_scope(url) as s:
        stats = run_stats(s, run_id)
        summary = run_summary(s, run_id)
        data = ops_stats.load_run(s, run_id)
    assert stats.mean_reward == pytest.approx(MEAN)
    assert summary == stats.summary() and summary["mean_reward"] == pytest.approx(MEAN)
    assert data.stats() == stats and data.by_state() == stats.by_state
    status = Client(Settings(data_dir=tmp_path, database_url=url)).status(run_id)
    assert status["mean_reward"] == pytest.approx(MEAN) and status["by_state"] == stats.by_state
    assert f"<td>mean reward</td><td>{MEAN:.3f}</td>" in render_html(data)
