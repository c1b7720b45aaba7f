"""The SQL chord backend: an atomic, idempotent counter closes each chord exactly once; its join retries
through a database outage; chord ids are stable."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from celery import Celery
from sqlalchemy.exc import OperationalError

from megaflow.chord_backend import SchemaMissing, SQLChordBackend, _retrying
from megaflow.db.schema import upgrade
from megaflow.hops.groups import stable_id


class RecordingBackend(SQLChordBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.fired: list[str] = []

    def _fire(self, gid, chord_body):
        self.fired.append(gid)


#: PostgreSQL is a real service: its cases are integration tests.
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]


def _backend(url: str) -> RecordingBackend:
    upgrade(url)  # the backend's tables are the schema's (migration 0007)
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


@pytest.mark.parametrize("db", DATABASES)
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


BACKEND_TABLES = {"megaflow_results", "megaflow_chords", "megaflow_chord_parts"}


@pytest.mark.parametrize("db", DATABASES)
def test_the_schema_has_the_backend_tables_and_alembic_sees_no_difference(db, request, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    from megaflow.db.engine import make_engine
    from megaflow.db.tables import metadata

    url = f"sqlite:///{tmp_path / 'r.sqlite'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    try:
        assert BACKEND_TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")] == []
    finally:
        engine.dispose()


def test_tables_made_earlier_by_create_all_upgrade_cleanly(tmp_path):
    from sqlalchemy import MetaData

    from megaflow.db.engine import make_engine
    from megaflow.db.tables import chords_table, parts_table, results_table

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    upgrade(url, "0006")
    engine = make_engine(url)
    old = MetaData()
    for table in (results_table, chords_table, parts_table):
        table.to_metadata(old)
    old.create_all(engine)  # what the backend itself did before migration 0007
    engine.dispose()
    _backend(url).store_result("tid", {"x": 1}, "SUCCESS")


def test_a_database_never_upgraded_is_refused_with_the_fix(tmp_path):
    backend = RecordingBackend(app=Celery("t", broker="memory://"), url=f"sqlite:///{tmp_path / 'r.sqlite'}")
    with pytest.raises(SchemaMissing, match="megaflow db upgrade"):
        backend.get("k")


def test_chord_join_retries_through_a_database_outage(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("insert", {}, Exception("server closed the connection unexpectedly"))
        return True

    assert _retrying(flaky, "test") is True and len(calls) == 3
    with pytest.raises(OperationalError):
        _retrying(lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down"))), "test", budget_s=0)


def test_chord_ids_are_stable():
    assert stable_id("chord", "g1", 0) == stable_id("chord", "g1", 0) != stable_id("chord", "g1", 1)
