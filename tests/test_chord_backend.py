"""The SQL chord backend: an atomic, idempotent counter closes each chord exactly once."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from celery import Celery

from megaflow.chord_backend import SQLChordBackend


class RecordingBackend(SQLChordBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.fired: list[str] = []

    def _fire(self, gid, chord_body):
        self.fired.append(gid)


def _backend(url: str) -> RecordingBackend:
    app = Celery("t", broker="memory://")
    return RecordingBackend(app=app, url=url)


def _members(backend, gid: str, n: int, duplicates: int, threads: int = 8):
    """Like Celery: members may finish before the size is set, which happens just
    before the last member is sent."""
    reqs = [SimpleNamespace(group=gid, id=f"{gid}-{i}", group_index=i, chord={"task": "body"}) for i in range(n)]
    early = reqs[:-1] + reqs[:duplicates]  # with redeliveries of already-finished members
    chunks = [early[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads)

    def run(chunk):
        barrier.wait()
        for r in chunk:
            backend.on_chord_part_return(r, "SUCCESS", r.group_index)

    ts = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    backend.set_chord_size(gid, n)
    backend.on_chord_part_return(reqs[-1], "SUCCESS", n - 1)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_chord_closes_exactly_once_under_concurrency_and_duplicates(db, request, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.sqlite'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    backend = _backend(url)
    for k in range(5):
        _members(backend, f"g{k}", n=60, duplicates=20)
    assert sorted(backend.fired) == [f"g{k}" for k in range(5)]


def test_chord_does_not_close_early_without_all_members(tmp_path):
    backend = _backend(f"sqlite:///{tmp_path / 'r.sqlite'}")
    backend.set_chord_size("g", 10)
    for i in range(9):
        r = SimpleNamespace(group="g", id=f"m{i}", group_index=i, chord={"task": "body"})
        backend.on_chord_part_return(r, "SUCCESS", i)
        backend.on_chord_part_return(r, "SUCCESS", i)  # each delivered twice
    assert backend.fired == []
    r = SimpleNamespace(group="g", id="m9", group_index=9, chord={"task": "body"})
    backend.on_chord_part_return(r, "SUCCESS", 9)
    assert backend.fired == ["g"]


def test_results_round_trip(tmp_path):
    backend = _backend(f"sqlite:///{tmp_path / 'r.sqlite'}")
    backend.store_result("tid", {"x": 1}, "SUCCESS")
    assert backend.get_task_meta("tid")["result"] == {"x": 1}
    backend.forget("tid")
    assert backend.get_task_meta("tid")["status"] == "PENDING"
