"""Every ``MEGAFLOW_*`` variable a user sets reaches code through `Settings` (fast, no service)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.config import Settings
from megaflow.local_stack import agent_processes

#: The variables users set today, and the field each one fills.
NAMES = {
    "MEGAFLOW_LOG_LEVEL": ("log_level", "DEBUG", "DEBUG"),
    "MEGAFLOW_WORKER_POOL": ("worker_pool", "solo", "solo"),
    "MEGAFLOW_WORKER_CONCURRENCY": ("worker_concurrency", "3", 3),
    "MEGAFLOW_WORKER_QUEUES": ("worker_queues", "a,b", "a,b"),
    "MEGAFLOW_AGENT_PROCESSES": ("agent_processes", "2", 2),
    "MEGAFLOW_SANDBOX_UID": ("sandbox_uid", "4242", 4242),
    "MEGAFLOW_DEBIAN_MIRROR": ("debian_mirror", "http://mirror.example/debian", "http://mirror.example/debian"),
    "MEGAFLOW_WHEELHOUSE": ("wheelhouse", "/srv/wheels", Path("/srv/wheels")),
}


@pytest.mark.parametrize("var", sorted(NAMES))
def test_each_variable_fills_its_field(monkeypatch, var):
    field, raw, value = NAMES[var]
    monkeypatch.setenv(var, raw)
    assert getattr(Settings(), field) == value


def test_every_field_is_documented():
    undocumented = [name for name, f in Settings.model_fields.items() if not f.description]
    assert undocumented == []


def test_env_round_trips_through_a_child(monkeypatch, tmp_path):
    for var in NAMES:
        monkeypatch.delenv(var, raising=False)
    settings = Settings(data_dir=tmp_path, worker_concurrency=3, worker_queues="q1, q2", placement=False,
                        flower_basic_auth="ops:pa55-w0rd")
    env = settings.env()
    assert env["MEGAFLOW_FLOWER_BASIC_AUTH"] == "ops:pa55-w0rd"  # the value, not pydantic's mask
    assert env["MEGAFLOW_PLACEMENT"] == "false" and "MEGAFLOW_WORKER_POOL" not in env  # None is left out
    for var, raw in env.items():
        monkeypatch.setenv(var, raw)
    child = Settings()
    assert child.model_dump() == settings.model_dump()
    assert child.worker_queue_names() == ["q1", "q2"]


def test_flower_credentials_stay_out_of_reprs(monkeypatch):
    monkeypatch.setenv("MEGAFLOW_FLOWER_BASIC_AUTH", "ops:pa55-w0rd")
    settings = Settings()
    assert settings.flower_basic_auth.get_secret_value() == "ops:pa55-w0rd"
    assert "pa55" not in repr(settings)


def test_agent_processes_on_a_server_database(monkeypatch):
    monkeypatch.setenv("MEGAFLOW_AGENT_PROCESSES", "3")
    assert agent_processes(Settings(broker_url="amqp://h//")) == 3
    assert agent_processes(Settings()) == 1  # embedded: SQLite takes one writer at a time


def test_worker_app_takes_pool_concurrency_and_queues_from_settings(monkeypatch, tmp_path):
    from workers.common import make_worker_app

    app = make_worker_app("model", Settings(data_dir=tmp_path, worker_pool="solo", worker_concurrency=2))
    assert (app.conf.worker_pool, app.conf.worker_concurrency) == ("solo", 2)
    app = make_worker_app("model", Settings(data_dir=tmp_path))
    assert (app.conf.worker_pool, app.conf.worker_concurrency) == ("threads", 16)
