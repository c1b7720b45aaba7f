"""The oracle's first command runs in its provision hop: one decision and one hop fewer per episode.

Driven in process (`InProcessRunner`: the real hop bodies and the `Driver` on SQLite rows).
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from megaflow.agent.oracle import OracleAgent
from megaflow.config import Settings
from megaflow.db.models import Episode, Hop, Step
from megaflow.hops.env_rebuild import replay_plan
from megaflow.inprocess import InProcessRunner
from megaflow.spec import TerminalTask


@pytest.fixture
def runner(tmp_path, sqlite_url):
    return InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))


def oracle(solution, check="test -f a.txt", **extra):
    return {"name": "oracle", "agent": {"type": "oracle"}, "sandbox": {"type": "memory"}, **extra,
            "tasks": [{"instance_id": "t", "instruction": "make a.txt", "check": check, "solution": solution}]}


def hops_taken(runner) -> list[str]:
    return [d.next.hop for _, _, d in runner.trace if d.next is not None]


def steps_and_hops(runner, episode_id: str):
    with runner.rt.session(readonly=True) as s:
        steps = s.execute(select(Step).where(Step.episode_id == episode_id).order_by(Step.index)).scalars().all()
        hops = s.execute(select(Hop.step_index, Hop.hop).where(Hop.subject_id == episode_id)).all()
        return steps, {(i, h) for i, h in hops}, replay_plan(s, episode_id)


def test_the_oracles_first_command_runs_in_the_provision_hop(runner):
    [out] = runner.run(oracle(["echo a > a.txt"]))
    assert (out.state, out.exit_status, out.reward) == ("succeeded", "submitted", 1.0)
    assert hops_taken(runner) == ["provision", "evaluate"]
    steps, hops, plan = steps_and_hops(runner, out.episode_id)
    task = TerminalTask(instance_id="t", instruction="make a.txt", check="true")
    assert [(m["role"], m["content"]) for m in steps[0].messages_in] == [
        (m.role, m.content) for m in OracleAgent().start(task)]
    assert (steps[0].action, steps[0].exit_code, steps[0].observation) == ("echo a > a.txt", 0, "")
    assert [s.action for s in steps] == ["echo a > a.txt", "submit"]
    assert (0, "exec") not in hops and (0, "provision") in hops
    # A rebuilt sandbox (its host died) replays it as it replays exec hops' commands.
    assert plan == [(0, "echo a > a.txt", 0)]
    with runner.rt.session(readonly=True) as s:
        assert s.get(Episode, out.episode_id).n_steps == 2


def test_later_commands_and_a_failing_first_one_go_on_as_before(runner):
    [out] = runner.run(oracle(["echo a > a.txt; exit 3", "echo b > b.txt"], check="test -f a.txt && test -f b.txt"))
    assert (out.state, out.reward) == ("succeeded", 1.0)
    assert hops_taken(runner) == ["provision", "exec", "evaluate"]
    steps, _, plan = steps_and_hops(runner, out.episode_id)
    assert [(s.action, s.exit_code) for s in steps] == [("echo a > a.txt; exit 3", 3), ("echo b > b.txt", 0),
                                                       ("submit", None)]
    assert steps[1].messages_in[0]["content"].startswith("[exit code 3]")  # the observation of step 0
    assert [i for i, _, _ in plan] == [0, 1]


def test_with_simulated_latencies_or_another_scaffold_every_command_has_its_exec_hop(runner):
    runner.run(oracle(["echo a > a.txt"], simulate={"exec_latency_s": 0.0}))
    assert hops_taken(runner) == ["provision", "exec", "evaluate"]
    runner.trace.clear()
    [out] = runner.run({"name": "bash", "model": {"type": "scripted", "replies": [
        "```bash\necho a > a.txt\n```", "```bash\nsubmit\n```"]}, "sandbox": {"type": "memory"},
        "tasks": [{"instance_id": "t", "instruction": "i", "check": "test -f a.txt"}]})
    assert hops_taken(runner) == ["provision", "generate", "exec", "generate", "evaluate"]
    _, _, plan = steps_and_hops(runner, out.episode_id)
    assert plan == [(0, "echo a > a.txt", 0)]  # once, though step 0 has both hops recorded
