"""The `Driver` through every ending, in process: SQLite, the scripted model, the memory sandbox.

No broker and no workers (`megaflow.inprocess`): each episode's decisions and hops
run here, in seconds. The same endings through real workers are in the integration
tests (`test_endings.py`, `test_pipeline.py`).
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, update

from megaflow import Settings
from megaflow.contract import Decision, HopResult
from megaflow.db import states
from megaflow.db.models import Episode, Run, Step
from megaflow.inprocess import InProcessRunner

SUBMIT = "```bash\nsubmit\n```"
#: A scaffold reply that runs a command and then, next turn, submits.
WORK_THEN_SUBMIT = ["```bash\necho hi > out.txt\n```", SUBMIT]


@pytest.fixture
def runner(tmp_path, sqlite_url):
    return InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))


def spec(replies=WORK_THEN_SUBMIT, check="test -f out.txt", limits=None, model=None, **task):
    return {"name": "driver", "model": {"type": "scripted", "replies": replies, **(model or {})},
            "sandbox": {"type": "memory"}, "limits": limits or {},
            "tasks": [{"instance_id": "t", "instruction": "write out.txt", "check": check, **task}]}


def one(runner, s) -> dict:
    [summary] = runner.run(s)
    return summary.model_dump()


def hops_taken(runner) -> list[str]:
    return [d.next.hop for _, _, d in runner.trace if d.next is not None]


def test_submitted_and_passing_checks_succeed_with_reward_1(runner):
    out = one(runner, spec())
    assert (out["state"], out["exit_status"], out["reward"]) == ("succeeded", "submitted", 1.0)
    assert hops_taken(runner) == ["provision", "generate", "exec", "generate", "evaluate"]


def test_submitted_with_failing_checks_still_succeeds_with_reward_0(runner):
    out = one(runner, spec(check="test -f missing.txt"))
    assert (out["state"], out["exit_status"], out["reward"]) == ("succeeded", "submitted", 0.0)


def test_step_limit_fails_with_the_no_submit_penalty(runner):
    out = one(runner, spec(replies=["```bash\ntrue\n```"], limits={"max_steps": 3, "no_submit_penalty": -0.5}))
    assert (out["state"], out["exit_status"], out["reward"]) == ("failed", "step_limit", -0.5)
    assert hops_taken(runner).count("exec") == 3


def test_token_limit_fails(runner):
    out = one(runner, spec(replies=["```bash\necho " + "word " * 50 + "\n```"], limits={"max_tokens": 20}))
    assert (out["state"], out["exit_status"]) == ("failed", "token_limit")


def test_format_errors_fail_after_the_allowed_number(runner):
    out = one(runner, spec(replies=["no code block here"], limits={"max_format_errors": 2}))
    assert (out["state"], out["exit_status"]) == ("failed", "format_errors")
    assert hops_taken(runner).count("generate") == 3  # two forgiven, the third ends it


def test_a_failing_setup_is_an_infra_failure_without_reward(runner):
    out = one(runner, spec(setup=["exit 3"]))
    assert (out["state"], out["exit_status"], out["reward"]) == ("infra_failed", "setup_failed", None)


def test_an_unavailable_model_is_an_infra_failure_and_the_sandbox_is_released(runner):
    s = spec(model={"latency_s": 0.2}, limits={"model_timeout_s": 0.05, "model_retries": 0})
    out = one(runner, s)
    assert (out["state"], out["exit_status"]) == ("infra_failed", "model_unavailable")
    assert hops_taken(runner)[-1] == "release"


def test_a_context_overflow_is_the_agents_failure(runner):
    out = one(runner, spec(instruction="x" * 1_000_001))
    assert (out["state"], out["exit_status"], out["reward"]) == ("failed", "context_length", -0.5)


def test_a_crashing_scaffold_ends_the_episode_agent_crashed(runner, monkeypatch):
    from megaflow.agent.bash import BashAgent

    def bug(self, text):
        raise KeyError("scaffold bug")

    monkeypatch.setattr(BashAgent, "parse", bug)
    out = one(runner, spec())
    assert (out["state"], out["exit_status"]) == ("infra_failed", "agent_crashed")
    with runner.rt.session() as s:
        assert "KeyError" in s.execute(select(Episode.error)).scalar()


def started(runner, s) -> tuple[str, HopResult]:
    """Record a run and take its one episode through provisioning: (episode id, the provision's result)."""
    run_id, _ = runner.client._record(_parse(s))
    with runner.rt.session() as db:
        eid = db.execute(select(Episode.id).where(Episode.run_id == run_id)).scalar_one()
    decision = runner.decide(eid, HopResult(hop="start"))
    return eid, runner.hop(eid, decision)


def _parse(s):
    from megaflow.spec import RunSpec

    return RunSpec.parse(s)


def test_a_passed_deadline_fails_the_episode_time_limit(runner):
    eid, provisioned = started(runner, spec())
    with runner.rt.session() as db:
        db.execute(update(Episode).where(Episode.id == eid).values(
            deadline_at=states.utcnow() - dt.timedelta(seconds=1)))
    out = runner.run_episode(eid, provisioned).model_dump()
    assert (out["state"], out["exit_status"], out["reward"]) == ("failed", "time_limit", -0.5)
    assert hops_taken(runner)[-1] == "release"


def test_a_cancelled_run_ends_its_episode_cancelled(runner):
    eid, provisioned = started(runner, spec())
    with runner.rt.session() as db:
        db.execute(update(Run).values(cancel_requested=True))
    out = runner.run_episode(eid, provisioned).model_dump()
    assert (out["state"], out["exit_status"]) == ("cancelled", "cancelled")


def test_a_failed_hop_result_ends_the_episode_with_its_exit_status(runner):
    eid, _ = started(runner, spec())
    poisoned = HopResult.received({"hop": "exec", "step": 0, "error": "delivered 6 times", "kind": "infra",
                                   "exit_status": "poison"})
    decision = runner.decide(eid, poisoned)
    assert decision.next is not None and decision.next.hop == "release"  # the sandbox goes back first
    with runner.rt.session() as db:
        ep = db.get(Episode, eid)
        assert (ep.state, ep.exit_status, ep.reward, ep.error) == ("infra_failed", "poison", None,
                                                                   "delivered 6 times")
    # Once released, the ended episode's decision is final and says so to its chord.
    final = runner.decide(eid, runner.hop(eid, decision))
    assert final == Decision.parse({"final": {"episode_id": eid, "state": "infra_failed", "exit_status": "poison"}})


def test_a_late_result_of_an_ended_episode_changes_nothing_but_releases_again(runner):
    out = one(runner, spec())
    eid = out["episode_id"]
    late = runner.decide(eid, HopResult(hop="exec", step=0, exit_code=0))
    assert late.next is not None and late.next.hop == "release"  # idempotent: its sandbox is gone already
    assert runner.decide(eid, runner.hop(eid, late)).final.model_dump() == out


def test_each_step_records_what_the_driver_set(runner):
    one(runner, spec())
    with runner.rt.session() as db:
        rows = db.execute(select(Step.index, Step.action, Step.exit_code).order_by(Step.index)).all()
    assert rows == [(0, "echo hi > out.txt", 0), (1, "submit", None)]
