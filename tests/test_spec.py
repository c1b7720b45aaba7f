"""The run spec (`megaflow.spec.RunSpec`): the example loads, tasks files are inlined, bad specs are refused
with the field named and nothing queued."""

from __future__ import annotations

import json

import pytest

from megaflow.errors import SpecError
from megaflow.spec import RunSpec

TASK = {"instance_id": "t", "instruction": "do it", "check": "true"}


def test_example_spec_loads():
    spec = RunSpec.load("examples/hello.yaml")
    assert spec.n_episodes == 6
    assert spec.model.type == "scripted" and spec.sandbox.type == "local"


@pytest.mark.parametrize("bad, needle", [
    ({}, "tasks"),
    ({"tasks": []}, "tasks"),
    ({"tasks": [TASK], "rollouts": "many"}, "rollouts"),
    ({"tasks": [TASK], "rollouts": 0}, "rollouts"),
    ({"tasks": [TASK], "model": {"type": "gpt-telepathy"}}, "model"),
    ({"tasks": [TASK], "sandbox": {"type": "vm"}}, "sandbox.type"),
    ({"tasks": [TASK], "sandbox": {"memory_mb": -1}}, "sandbox.memory_mb"),
    ({"tasks": [TASK], "limits": {"max_steps": 10**9}}, "limits.max_steps"),
    ({"tasks": [TASK], "colour": "blue"}, "colour"),
    ({"tasks": [{"instance_id": "t", "instruction": "x"}]}, "check"),
    ({"tasks": [TASK, TASK]}, "duplicate instance_id"),
    ({"tasks": [TASK], "rollouts": 4096, "name": "x" * 300}, "name"),
])
def test_invalid_specs_are_refused_with_the_field_named(bad, needle):
    with pytest.raises(SpecError) as err:
        RunSpec.parse(bad)
    assert needle in str(err.value)


def test_absurd_size_is_refused():
    tasks = [dict(TASK, instance_id=f"t{i}") for i in range(300)]
    with pytest.raises(SpecError, match="over the limit"):
        RunSpec.parse({"tasks": tasks, "rollouts": 4000})


def test_unreadable_spec_file(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="cannot read spec"):
        RunSpec.load(p)


def test_tasks_file_is_inlined(tmp_path):
    (tmp_path / "tasks.jsonl").write_text(json.dumps(TASK) + "\n")
    (tmp_path / "spec.json").write_text(json.dumps({"tasks_file": "tasks.jsonl", "rollouts": 3}))
    assert RunSpec.load(tmp_path / "spec.json").n_episodes == 3


def test_invalid_spec_queues_nothing(sqlite_url, tmp_path):
    from megaflow import Client, Settings

    settings = Settings(data_dir=tmp_path, database_url=sqlite_url)
    client = Client(settings)
    with pytest.raises(SpecError):
        client.submit({"tasks": [TASK], "rollouts": -3})
    from sqlalchemy import func, select

    from megaflow.db.models import Episode, Run

    with client.session() as s:
        assert s.execute(select(func.count()).select_from(Run)).scalar() == 0
        assert s.execute(select(func.count()).select_from(Episode)).scalar() == 0
    assert not (tmp_path / "broker.sqlite").exists() or _broker_empty(tmp_path / "broker.sqlite")


def _broker_empty(path) -> bool:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return con.execute("select count(*) from kombu_message").fetchone()[0] == 0
    except sqlite3.OperationalError:
        return True
