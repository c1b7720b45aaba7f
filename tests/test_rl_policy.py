"""Policy versions (issue 18, point 2), without services: checkpoint checks, publishing on
SQLite (numbering, concurrent publishers), the spec's rl block, and the weight switches of
the backends at a safe point (the scripted fake, the batcher)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from megaflow.db.engine import session_scope
from megaflow.errors import SpecError
from megaflow.model import policy as policies
from megaflow.model.policy import PolicyError, PolicyRef
from megaflow.spec import RunSpec

TASK = {"instance_id": "t", "instruction": "x", "check": "true"}


def full_checkpoint(root: Path, name: str = "ckpt") -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def lora_adapter(root: Path, name: str = "adapter") -> Path:
    path = root / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_checkpoint_checks(tmp_path):
    full, lora = full_checkpoint(tmp_path), lora_adapter(tmp_path)
    assert policies.check_checkpoint(str(full), "full") == str(full)
    assert policies.check_checkpoint(str(lora), "lora") == str(lora)
    state = tmp_path / "weights.safetensors"
    state.write_bytes(b"")
    assert policies.check_checkpoint(str(state), "full") == str(state)
    with pytest.raises(PolicyError, match="does not exist"):
        policies.check_checkpoint(str(tmp_path / "nope"), "full")
    with pytest.raises(PolicyError, match="kind 'lora'"):
        policies.check_checkpoint(str(lora), "full")
    with pytest.raises(PolicyError, match="not a PEFT LoRA adapter"):
        policies.check_checkpoint(str(full), "lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="not a full checkpoint"):
        policies.check_checkpoint(str(tmp_path / "empty"), "full")
    with pytest.raises(PolicyError, match="must be one of"):
        policies.check_checkpoint(str(full), "delta")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(PolicyError, match="not a state-dict file"):
        policies.check_checkpoint(str(notes), "full")


def test_publish_numbers_versions_per_policy_and_refuses_bad_paths(sqlite_url, tmp_path):
    factory = lambda: session_scope(sqlite_url)
    ckpt = full_checkpoint(tmp_path)
    assert policies.publish(factory, str(ckpt)).version == 1
    assert policies.publish(factory, str(lora_adapter(tmp_path)), kind="lora").version == 2
    assert policies.publish(factory, str(ckpt), policy="other", meta={"step": 7}).version == 1
    with pytest.raises(PolicyError):
        policies.publish(factory, str(tmp_path / "missing"))
    with session_scope(sqlite_url) as s:
        assert policies.newest_version(s, "default") == 2
        assert policies.newest(s, "default") == PolicyRef("default", 2, str(tmp_path / "adapter"), "lora")
        assert policies.newest(s, "nobody") is None
        rows = policies.versions(s)
        assert [(r.policy, r.version) for r in rows] == [("default", 2), ("default", 1), ("other", 1)]
        assert rows[2].meta == {"step": 7}


def test_concurrent_publishers_get_distinct_versions(sqlite_url, tmp_path):
    ckpt = str(full_checkpoint(tmp_path))
    got: list[int] = []

    def publisher():
        for _ in range(5):
            got.append(policies.publish(lambda: session_scope(sqlite_url), ckpt).version)

    threads = [threading.Thread(target=publisher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))


def test_policy_ref_wire_round_trip():
    ref = PolicyRef("p", 3, "/x", "lora")
    assert PolicyRef.parse(ref.wire()) == ref


def test_rl_block_is_validated():
    spec = RunSpec.parse({"tasks": [TASK], "rl": {"mode": "sync", "groups_per_batch": 2}})
    assert spec.rl.bound == 0 and spec.rl.policy == "default"
    assert RunSpec.parse({"tasks": [TASK], "rl": {"max_staleness": 2}}).rl.bound == 2
    assert RunSpec.parse({"tasks": [TASK], "rl": {}}).rl.bound is None
    assert RunSpec.parse({"tasks": [TASK]}).rl is None
    for bad, why in [({"mode": "sync", "max_staleness": 1}, "async only"), ({"mode": "later"}, "rl.mode"),
                     ({"max_staleness": -1}, "rl.max_staleness"), ({"groups_per_batch": 0}, "groups_per_batch"),
                     ({"policy": "a b"}, "rl.policy"), ({"stale": 1}, "rl.stale")]:
        with pytest.raises(SpecError, match=why):
            RunSpec.parse({"tasks": [TASK], "rl": bad})


def test_a_barrier_splits_batches_and_runs_between_them():
    """What a weight swap relies on: jobs queued before it run before, jobs queued after run after."""
    from megaflow.model.batching import MicroBatcher

    seen: list = []
    release = threading.Event()

    def run_batch(jobs):
        release.wait(5)
        seen.append(sorted(j.payload for j in jobs))
        for j in jobs:
            j.future.set_result(j.payload)

    batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.05)
    try:
        first = [batcher.submit("k", i) for i in range(3)]
        swap = batcher.barrier(lambda: seen.append("swap") or "swapped")
        later = [batcher.submit("k", i) for i in range(3, 6)]
        release.set()
        assert [f.result(5) for f in first + later] == list(range(6))
        assert swap.result(5) == "swapped"
        assert seen == [[0, 1, 2], "swap", [3, 4, 5]]
        failing = batcher.barrier(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert batcher.submit("k", 9).result(5) == 9  # the thread lives on
    finally:
        batcher.close()


def test_scripted_model_switches_whole_replies():
    from megaflow.model.base import Message, ModelRequest
    from megaflow.model.config import ScriptedModelConfig
    from megaflow.model.scripted import ScriptedModel

    model = ScriptedModel(ScriptedModelConfig(replies=["v{version}"]))
    request = ModelRequest(messages=[Message(role="user", content="hi")])
    assert (model.generate(request).text, model.generate(request).policy_version) == ("v0", 0)
    model.load_policy(PolicyRef("default", 2, "/x"))
    model.load_policy(PolicyRef("default", 1, "/x"))  # an older one, late: ignored
    done = model.generate(request)
    assert (done.text, done.policy_version) == ("v2", 2)


def test_followers_switch_a_lagging_client_before_its_request(sqlite_url, tmp_path):
    from megaflow.model.config import ScriptedModelConfig
    from megaflow.model.scripted import ScriptedModel
    from megaflow.model.weights import Followers

    followers = Followers(sqlite_url, lambda readonly=False: session_scope(sqlite_url, readonly=readonly))
    client = ScriptedModel(ScriptedModelConfig())
    followers.add("p", client)
    assert followers.follow(client, "p") == 0 and client.policy_version == 0
    policies.publish(lambda: session_scope(sqlite_url), str(full_checkpoint(tmp_path)), policy="p")
    policies.publish(lambda: session_scope(sqlite_url), str(full_checkpoint(tmp_path, "c2")), policy="other")
    assert followers.follow(client, "p") == 1 and client.policy_version == 1
    with pytest.raises(TypeError, match="cannot switch"):
        followers.add("p", object())
    followers.close()


def test_the_policy_cli_publishes_lists_and_refuses_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from megaflow.cli.main import app

    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path / "data"))
    for name in ("MEGAFLOW_DATABASE_URL", "MEGAFLOW_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    cli = CliRunner()
    ckpt = full_checkpoint(tmp_path)
    out = cli.invoke(app, ["policy", "publish", str(ckpt), "--meta", '{"step": 3}', "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"version": 1, "path": str(ckpt), "kind": "full"}
    bad = cli.invoke(app, ["policy", "publish", str(ckpt), "--kind", "lora"])
    assert bad.exit_code == 2 and "not a PEFT LoRA adapter" in bad.output and len(bad.output.splitlines()) == 1
    assert cli.invoke(app, ["policy", "publish", str(ckpt), "--meta", "[1]"]).exit_code == 2
    listed = cli.invoke(app, ["policy", "list", "--json"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [(r["policy"], r["version"], r["meta"]) for r in rows] == [("default", 1, {"step": 3})]

