"""RL batches made from episode rows (SQLite, no services): token ids, masks, logprobs, versions, drops."""

from __future__ import annotations

import json

import pytest

from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, RolloutGroup, Run, Step, TaskInstance, new_id
from megaflow.rl.batches import Batch, MissingTokensError, assemble
from megaflow.rl.handoff import BatchStream


class CharTokenizer:
    """A fake ChatTokenizer: two ids per message header, one per character, one for the generation prompt."""

    def turn_ids(self, history, new):
        ids = []
        for m in new:
            ids += [1, 2] + [ord(c) for c in m["content"]]
        return ids + [3]

    def text_ids(self, text):
        return [ord(c) for c in text]


def _turns(recorded: bool | str):
    """Two turns. Recorded prompts are whole prompts, each extending the sequence before it
    ("drift": the second holds the first reply re-tokenized, not as sampled)."""
    p0 = [1, 2, 100, 3]
    p1 = p0 + ([78] if recorded == "drift" else [7, 8]) + [1, 2, 101, 3]
    return [
        {"messages_in": [{"role": "user", "content": "u"}], "completion": "ab", "token_ids": [7, 8],
         "logprobs": [-0.5, -0.25], "policy_version": 3, "prompt_token_ids": p0 if recorded else None},
        {"messages_in": [{"role": "user", "content": "o"}], "completion": "c", "token_ids": [9],
         "logprobs": [-1.0], "policy_version": 4, "prompt_token_ids": p1 if recorded else None},
    ]


def _run(url, groups: list[list[tuple[str, float | None, bool | str]]]) -> tuple[str, list[str]]:
    """A finished run: per group, episodes (state, reward, prompts recorded?) with advantages as close_group writes."""
    with session_scope(url) as s:
        run = Run(id=new_id(), name="rl", spec={}, status="finished")
        s.add(run)
        s.flush()
        ti = TaskInstance(id=new_id(), run_id=run.id, instance_id="t1", kind="terminal", data={})
        s.add(ti)
        s.flush()
        gids = []
        for gi, episodes in enumerate(groups):
            g = RolloutGroup(id=new_id(), run_id=run.id, task_instance_id=ti.id, index=gi, size=len(episodes),
                             status="finished")
            s.add(g)
            s.flush()
            gids.append(g.id)
            for k, (state, reward, recorded) in enumerate(episodes):
                ep = Episode(id=new_id(), seq=gi * 100 + k, run_id=run.id, group_id=g.id, task_instance_id=ti.id,
                             sample_index=k, state=state, reward=reward,
                             advantage=None if state == states.INFRA_FAILED else (reward - 0.5) * 2,
                             exit_status="submitted" if state != states.INFRA_FAILED else "sandbox_error")
                s.add(ep)
                s.flush()
                for i, t in enumerate(_turns(recorded)):
                    s.add(Step(episode_id=ep.id, index=i, **t))
        return run.id, gids


def test_a_batch_carries_recorded_ids_masks_aligned_logprobs_and_versions(sqlite_url):
    run_id, gids = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, True), (states.FAILED, 0.0, True)]])
    with session_scope(sqlite_url) as s:
        batch = assemble(s, run_id, "b1", gids)
    assert [e.sample_index for e in batch.episodes] == [0, 1]
    ep = batch.episodes[0]
    # The second turn's recorded prompt contributes only what follows the first turn.
    assert ep.prompt_token_ids == [[1, 2, 100, 3], [1, 2, 101, 3]]
    assert ep.completion_token_ids == [[7, 8], [9]]
    assert ep.input_ids == [1, 2, 100, 3, 7, 8, 1, 2, 101, 3, 9]
    assert ep.loss_mask == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1]
    assert ep.behaviour_logprobs == [0, 0, 0, 0, -0.5, -0.25, 0, 0, 0, 0, -1.0]
    assert ep.policy_versions == [3, 4]
    assert (ep.reward, ep.advantage, ep.group_id, ep.exit_status) == (1.0, 1.0, gids[0], "submitted")
    assert (batch.episodes[1].reward, batch.episodes[1].advantage) == (0.0, -1.0)


def test_infra_failed_episodes_are_dropped_and_listed(sqlite_url):
    run_id, gids = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, True), (states.INFRA_FAILED, None, True)],
                                     [(states.INFRA_FAILED, None, True)]])
    with session_scope(sqlite_url) as s:
        batch = assemble(s, run_id, "b1", gids)
    assert batch.group_ids == gids and len(batch) == 1
    assert [(d["group_id"], d["state"], d["exit_status"]) for d in batch.dropped] == [
        (gids[0], states.INFRA_FAILED, "sandbox_error"), (gids[1], states.INFRA_FAILED, "sandbox_error")]


def test_without_recorded_prompts_the_tokenizer_gives_them_and_without_it_the_error_names_the_fix(sqlite_url):
    run_id, gids = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, False)]])
    with session_scope(sqlite_url) as s:
        with pytest.raises(MissingTokensError, match="pass tokenizer="):
            assemble(s, run_id, "b1", gids)
        ep = assemble(s, run_id, "b1", gids, tokenizer=CharTokenizer()).episodes[0]
    assert ep.prompt_token_ids == [[1, 2, ord("u"), 3], [1, 2, ord("o"), 3]]
    assert ep.loss_mask == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1]


def test_to_dict_is_json_without_the_ack_and_a_loose_batch_cannot_be_acked(sqlite_url):
    run_id, gids = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, True)]])
    with session_scope(sqlite_url) as s:
        batch = assemble(s, run_id, "b1", gids)
    data = json.loads(json.dumps(batch.to_dict()))
    assert set(data) == {"run_id", "batch_id", "group_ids", "episodes", "dropped", "handouts"}
    assert data["episodes"][0]["loss_mask"] == batch.episodes[0].loss_mask
    with pytest.raises(RuntimeError, match="not handed out"):
        Batch(run_id, "b", [], []).ack()


def test_batches_on_sqlite_fail_with_one_line_naming_postgresql(sqlite_url):
    with pytest.raises(ValueError, match="needs PostgreSQL") as err:
        BatchStream(sqlite_url, "r", 2)
    assert "\n" not in str(err.value)


def test_the_cli_on_sqlite_says_in_one_line_that_batches_need_postgresql(sqlite_url, tmp_path):
    from typer.testing import CliRunner

    from megaflow.cli.main import app

    run_id, _ = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, True)]])
    env = {"MEGAFLOW_DATA_DIR": str(tmp_path), "MEGAFLOW_DATABASE_URL": sqlite_url}
    result = CliRunner().invoke(app, ["batches", run_id, "--groups", "1"], env=env)
    assert result.exit_code == 1
    assert result.output.strip().startswith("client.batches needs PostgreSQL") and result.output.count("\n") == 1


def test_g_defaults_to_the_runs_rl_setting_and_may_not_outgrow_a_bounded_run():
    from megaflow.rl.handoff import batch_size

    assert batch_size("r", {"groups_per_batch": 4, "mode": "sync"}, None) == 4
    assert batch_size("r", {"groups_per_batch": 4, "mode": "async", "max_staleness": 1}, 2) == 2
    assert batch_size("r", {"groups_per_batch": 4, "mode": "async", "max_staleness": None}, 9) == 9
    assert batch_size("r", None, 3) == 3
    with pytest.raises(ValueError, match="holds back the groups"):
        batch_size("r", {"groups_per_batch": 4, "mode": "sync"}, 5)
    with pytest.raises(ValueError, match="give groups_per_batch"):
        batch_size("r", None, None)
    with pytest.raises(ValueError, match="at least 1"):
        batch_size("r", None, 0)


def test_an_episode_whose_recorded_prompts_drift_is_dropped_without_a_tokenizer_and_kept_with_one(sqlite_url):
    run_id, gids = _run(sqlite_url, [[(states.SUCCEEDED, 1.0, True), (states.FAILED, 0.0, "drift")]])
    with session_scope(sqlite_url) as s:
        batch = assemble(s, run_id, "b1", gids)
        [kept] = batch.episodes
        [dropped] = batch.dropped
        assert kept.sample_index == 0 and "does not extend the turns before it" in dropped["reason"]
        # With a tokenizer the drifting turn's prompt comes from the chat template instead.
        both = assemble(s, run_id, "b1", gids, tokenizer=CharTokenizer())
    assert len(both.episodes) == 2 and not both.dropped
    assert both.episodes[1].prompt_token_ids == [[1, 2, 100, 3], [1, 2, ord("o"), 3]]
