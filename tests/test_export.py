"""Exports: row building without services, then every format from a real finished run."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import need

from megaflow.export import episode_record, export_run, trainer_row, write_parquet


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class CharTokenizer:
    """A fake ChatTokenizer: one id per character, two per message header, one for the generation prompt."""

    def turn_ids(self, history, new):
        ids = []
        for m in new:
            ids += [1, 2] + [ord(c) for c in m["content"]]
        return ids + [3]

    def text_ids(self, text):
        return [ord(c) for c in text]


def _rows():
    ep = SimpleNamespace(id="e1", run_id="r1", group_id="g1", sample_index=0, state="succeeded",
                         exit_status="submitted", reward=1.0, advantage=0.5, error=None, n_steps=2, format_errors=0,
                         tokens=9, patch=None, started_at=None, finished_at=None, grading=None, test_log=None)
    ti = SimpleNamespace(instance_id="i1", kind="terminal")
    fields = {"action": None, "exit_code": None, "observation": None, "finish_reason": "stop", "model": "m",
              "model_version": "v1", "prompt_tokens": 1, "completion_tokens": 2, "model_s": 0.1, "exec_s": None,
              "agent_s": 0.01}
    steps = [
        SimpleNamespace(index=0, messages_in=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                        completion="ab", token_ids=[7, 8], logprobs=[-0.1, -0.2], **fields),
        # A backend that returned no token ids: the tokenizer fills them in.
        SimpleNamespace(index=1, messages_in=[{"role": "user", "content": "o"}], completion="c", token_ids=None,
                        logprobs=None, **fields),
    ]
    return ep, ti, steps


def test_trainer_row_masks_only_completion_tokens():
    row = trainer_row(*_rows(), tokenizer=CharTokenizer())
    assert row["prompt_token_ids"] == [[1, 2, ord("s"), 1, 2, ord("u"), 3], [1, 2, ord("o"), 3]]
    assert row["completion_token_ids"] == [[7, 8], [ord("c")]]
    assert row["input_ids"] == row["prompt_token_ids"][0] + [7, 8] + row["prompt_token_ids"][1] + [ord("c")]
    assert row["loss_mask"] == [0] * 7 + [1, 1] + [0] * 4 + [1]
    assert row["completion_logprobs"] == [[-0.1, -0.2], None]
    assert (row["reward"], row["advantage"], row["group_id"], row["n_turns"]) == (1.0, 0.5, "g1", 2)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_trainer_row_without_tokenizer_leaves_prompt_ids_unknown():
    row = trainer_row(*_rows())
    assert row["prompt_token_ids"] is None and row["input_ids"] is None and row["loss_mask"] is None
    assert row["completion_token_ids"] == [[7, 8], None]


@pytest.mark.integration
def test_hf_chat_tokenizer_gives_each_turn_its_templated_prompt(smollm2_tokenizer):
    from megaflow.export import HFChatTokenizer

    tok = HFChatTokenizer(smollm2_tokenizer)
    first = [{"role": "system", "content": "sys"}, {"role": "user", "content": "do it"}]
    history = [*first, {"role": "assistant", "content": "ok"}]
    p0 = tok.turn_ids([], first)
    p1 = tok.turn_ids(history, [{"role": "user", "content": "<returncode>0</returncode>"}])
    assert all(isinstance(i, int) for i in p0 + p1)
    assert tok.tok.decode(p0).endswith("do it<|im_end|>\n<|im_start|>assistant\n")
    assert tok.tok.decode(p1) == "<|im_start|>user\n<returncode>0</returncode><|im_end|>\n<|im_start|>assistant\n"
    assert tok.tok.decode(tok.text_ids("ls -la")) == "ls -la"


def test_episode_record_is_json_with_steps_and_timings():
    rec = json.loads(json.dumps(episode_record(*_rows())))
    assert rec["instance_id"] == "i1" and rec["exit_status"] == "submitted"
    assert [s["token_ids"] for s in rec["steps"]] == [[7, 8], None]
    assert rec["steps"][0]["model_s"] == 0.1 and rec["steps"][0]["agent_s"] == 0.01


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"megaflow\[export\]"):
        write_parquet(tmp_path / "x.parquet", iter([]))
    assert not list(tmp_path.iterdir())


def test_export_refuses_unknown_runs_and_formats(sqlite_url, tmp_path):
    from megaflow.db.engine import session_scope

    with session_scope(sqlite_url) as s:
        with pytest.raises(LookupError):
            export_run(s, "nope", "jsonl", tmp_path / "x.jsonl")
        with pytest.raises(ValueError, match="unknown export format"):
            export_run(s, "nope", "csv", tmp_path / "x.csv")


# -- a real run ------------------------------------------------------------------

SWE_SETUP = "git init -q . && git add -A && git -c user.email=t@t -c user.name=t commit -qm init"
REPLIES = ["```bash\nprintf 'x = 2\\n' > a.py\n```", "```bash\nsubmit\n```"]


@pytest.fixture
def finished_run(tmp_path, pg_url, amqp_vhost):
    from megaflow import Client, Settings
    from megaflow.db.schema import upgrade
    from megaflow.local_stack import WorkerProcess

    settings = Settings(data_dir=tmp_path / "state", database_url=pg_url, broker_url=amqp_vhost, host="it-host")
    upgrade(pg_url)
    workers = [WorkerProcess(p, settings, name=p).start() for p in ("model", "agent", "env")]
    try:
        client = Client(settings)
        run_id = client.submit({
            "name": "export", "rollouts": 2,
            "model": {"type": "scripted", "replies": REPLIES, "name": "scripted-7b"},
            "sandbox": {"type": "local"},
            "tasks": [
                {"kind": "swe", "instance_id": "repo__1", "problem_statement": "x must be 2",
                 "files": {"a.py": "x = 1\n"}, "setup": [SWE_SETUP],
                 "test_command": "python3 -c 'import a; assert a.x == 2'"},
                {"instance_id": "term-1", "instruction": "make x 2", "files": {"a.py": "x = 1\n"},
                 "check": "grep -q 'x = 2' a.py"},
            ],
        })
        assert client.wait(run_id, timeout=120)["by_state"] == {"succeeded": 4}
        yield settings, client, run_id
    finally:
        for w in workers:
            w.stop()


@pytest.mark.integration
def test_every_format_from_a_finished_run(finished_run, tmp_path):
    need("pyarrow and datasets", have("pyarrow") and have("datasets"), "pip install 'megaflow[export]'")
    import datasets

    _, client, run_id = finished_run
    results = {r["episode_id"]: r for r in client.results(run_id)}

    # JSONL: one episode per line, round-tripping what the database holds.
    assert client.export(run_id, "jsonl", tmp_path / "eps.jsonl") == 4
    lines = [json.loads(line) for line in (tmp_path / "eps.jsonl").read_text().splitlines()]
    assert {e["episode_id"] for e in lines} == set(results)
    for e in lines:
        r = results[e["episode_id"]]
        assert (e["instance_id"], e["state"], e["exit_status"], e["reward"], e["advantage"]) == (
            r["instance_id"], "succeeded", "submitted", 1.0, r["advantage"])
        assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert [s["action"] for s in e["steps"]] == ["printf 'x = 2\\n' > a.py", "submit"]
        assert all(s["token_ids"] and len(s["token_ids"]) == len(s["logprobs"]) for s in e["steps"])
        assert all(s["model_s"] is not None and s["agent_s"] is not None for s in e["steps"])
        assert e["steps"][0]["exec_s"] is not None and e["steps"][0]["exit_code"] == 0
    assert {e["patch"] is not None for e in lines if e["task_kind"] == "swe"} == {True}

    # Parquet, read back by the datasets library as a trainer would.
    assert client.export(run_id, "parquet", tmp_path / "eps.parquet", tokenizer=CharTokenizer()) == 4
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "eps.parquet"), split="train")
    assert ds.num_rows == 4
    for row in ds:
        assert len(row["input_ids"]) == len(row["loss_mask"])
        completion = sum(len(c) for c in row["completion_token_ids"])
        assert sum(row["loss_mask"]) == completion > 0
        assert len(row["prompt_token_ids"]) == len(row["completion_token_ids"]) == row["n_turns"] == 2
        assert row["reward"] == 1.0 and row["group_id"]
    assert len(set(ds["group_id"])) == 2 and set(ds["instance_id"]) == {"repo__1", "term-1"}

    # SWE-bench predictions: one per SWE instance, with the agent's patch.
    assert client.export(run_id, "swebench", tmp_path / "preds.jsonl") == 1
    [pred] = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert set(pred) == {"instance_id", "model_name_or_path", "model_patch"}
    assert pred["instance_id"] == "repo__1" and pred["model_name_or_path"] == "scripted-7b"
    assert "-x = 1\n+x = 2" in pred["model_patch"]

    # mini-swe-agent trajectories, laid out as its SWE-bench runner does.
    assert client.export(run_id, "minisweagent", tmp_path / "trajs") == 4
    traj = json.loads((tmp_path / "trajs" / "repo__1" / "repo__1.traj.json").read_text())
    assert traj["trajectory_format"] == "mini-swe-agent-1.1" and traj["info"]["exit_status"] == "Submitted"
    assert "+x = 2" in traj["info"]["submission"]
    assert (tmp_path / "trajs" / "term-1" / "term-1.sample1.traj.json").exists()


@pytest.mark.integration
def test_cli_export_writes_what_the_client_writes(finished_run, tmp_path):
    from typer.testing import CliRunner

    from megaflow.cli.main import app
    from megaflow.local_stack import settings_env

    settings, client, run_id = finished_run
    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(app, ["export", run_id, "--format", "jsonl", "--out", str(out)],
                                env=settings_env(settings))
    assert result.exit_code == 0, result.output
    assert "4 records" in result.output
    client.export(run_id, "jsonl", tmp_path / "api.jsonl")
    assert out.read_text() == (tmp_path / "api.jsonl").read_text()
    result = CliRunner().invoke(app, ["export", "no-such-run", "--out", str(tmp_path / "x.jsonl")],
                                env=settings_env(settings))
    assert result.exit_code == 1 and "no run" in result.output
