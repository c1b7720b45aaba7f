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
