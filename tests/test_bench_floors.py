"""The floors `megaflow bench pipeline` divides by, measured for real: no-op tasks, and
relay tasks that only hand on to their successor (the pipeline's shape without its work)."""

from __future__ import annotations

import pytest

from megaflow.app import make_app
from megaflow.bench.floors import celery_noop_tasks_per_s, celery_relay_tasks_per_s, tasks_done
from megaflow.config import Settings

pytestmark = pytest.mark.integration


def test_relay_and_noop_floors(pg_url, amqp_vhost, tmp_path, monkeypatch):
    settings = Settings(broker_url=amqp_vhost, database_url=pg_url, data_dir=tmp_path)
    app = make_app(settings)
    counted = []
    real = tasks_done

    def spy(app_, *names):
        counted.append(real(app_, *names))
        return counted[-1]

    monkeypatch.setattr("megaflow.bench.floors.tasks_done", spy)
    relay = celery_relay_tasks_per_s(app, settings, n=240, chains=8)
    # Eight chains of 30: the worker ran every hand-on, not just the eight first tasks.
    assert counted[-1] - counted[0] >= 240
    assert relay > 0
    counted.clear()
    noop = celery_noop_tasks_per_s(app, settings, n=200)
    assert counted[-1] - counted[0] >= 200 and noop > 0
