"""Bad input, refused or contained: invalid specs before anything is queued, malformed and
poison messages on every queue against the real RabbitMQ, PostgreSQL and Celery workers.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_megaflow
from sqlalchemy import func, select

from megaflow import Client, Settings
from megaflow.bench.badinput import BAD_SPECS, TASK, dead_letters, malformed_messages, publish
from megaflow.db.models import Delivery, Episode, Event, Run, Step
from megaflow.errors import SpecError
from megaflow.local_stack import WorkerProcess
from megaflow.spec import RunSpec

HOST = "bad-host"

pytestmark = pytest.mark.cluster(host=HOST, name="bad-", env={"MEGAFLOW_HOP_MAX_DELIVERIES": "2",
                                                                   "MEGAFLOW_WORKER_CONCURRENCY": "4"})

@pytest.mark.parametrize("bad, needle", BAD_SPECS, ids=[f"bad{i}" for i in range(len(BAD_SPECS))])
def test_invalid_spec_is_refused_with_a_clear_message(bad, needle):
    with pytest.raises(SpecError) as err:
        RunSpec.parse(bad)
    message = str(err.value)
    assert needle in message, message
    assert "Traceback" not in message
    # A refused credential is never repeated back.
    for secret in ("sk-live-0123456789abcdefghij", "hunter2hunter2", "sk-0123456789abcdefghijkl"):
        assert secret not in message


def test_valid_specs_still_pass():
    RunSpec.parse({"tasks": [TASK], "model": {"type": "openai", "model": "m", "endpoints": ["http://h:8000/v1"],
                                              "api_key_env": "OPENAI_API_KEY"},
                   "sandbox": {"env": {"LANG": "C.UTF-8"}, "workdir": "/work/repo"}})
    RunSpec.parse({"tasks": [dict(TASK, instance_id="django__django-11099", files={"src/a.py": "x"})]})
    RunSpec.parse({"tasks": [{"kind": "swe", "instance_id": "org/repo-1", "problem_statement": "p",
                              "repo": "https://example.org/r.git#v1.2"}]})


def test_huge_spec_is_validated_quickly():
    """A million-episode spec is judged in seconds, not hours (no quadratic checks)."""
    tasks = [dict(TASK, instance_id=f"t{i}") for i in range(100_000)]
    t0 = time.monotonic()
    with pytest.raises(SpecError, match="over the limit"):
        RunSpec.parse({"tasks": tasks, "rollouts": 11})
    assert time.monotonic() - t0 < 30


def test_deadline_beyond_the_brokers_consumer_timeout_is_refused(sqlite_url, tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, consumer_timeout_s=1800)
    client = Client(settings)
    with pytest.raises(SpecError, match="limits.exec_timeout_s.*consumer_timeout|consumer timeout") as err:
        client.submit({"tasks": [TASK], "limits": {"exec_timeout_s": 7200}})
    assert "MEGAFLOW_CONSUMER_TIMEOUT_S" in str(err.value)
    with client.session() as s:
        assert s.execute(select(func.count()).select_from(Run)).scalar() == 0
    # Raised together with the broker's setting, the same limit fits.
    big = Client(Settings(data_dir=tmp_path, database_url=sqlite_url, consumer_timeout_s=4 * 3600))
    from megaflow.deadlines import check_spec

    check_spec(RunSpec.parse({"tasks": [TASK], "limits": {"exec_timeout_s": 7200}}), big.settings)


def test_cli_refuses_bad_spec_files_with_a_message_and_no_traceback(tmp_path):
    bad = {
        "notyaml.yaml": "tasks: [unclosed",
        "list.yaml": "- just\n- a list\n",
        "missing.json": json.dumps({"rollouts": 2}),
        "secret.json": json.dumps({"tasks": [TASK], "sandbox": {"env": {"GITHUB_TOKEN": "ghp_" + "a" * 36}}}),
        "timeout.json": json.dumps({"tasks": [TASK], "limits": {"model_timeout_s": 86400}}),
    }
    for i, (name, text) in enumerate(bad.items()):
        (tmp_path / name).write_text(text)
        if i == 0:  # the real entry point once; the others in process (the same code, no interpreter start)
            r = run_megaflow(["submit", str(tmp_path / name)], tmp_path / "data", timeout=120)
            code, out = r.returncode, r.stdout + r.stderr
        else:
            from typer.testing import CliRunner

            from megaflow.cli.main import app

            result = CliRunner().invoke(app, ["submit", str(tmp_path / name)],
                                        env={"MEGAFLOW_DATA_DIR": str(tmp_path / "data")})
            code, out = result.exit_code, result.output + repr(result.exception or "")
        assert code == 2, (name, out)
        assert "nothing queued" in out and "Traceback" not in out, (name, out)
        assert "a" * 36 not in out
    assert not (tmp_path / "data" / "broker.sqlite").exists() or _no_messages(tmp_path / "data" / "broker.sqlite")


def _no_messages(path) -> bool:
    import sqlite3

    try:
        return sqlite3.connect(path).execute("select count(*) from kombu_message").fetchone()[0] == 0
    except sqlite3.OperationalError:
        return True


# -- against the real broker and workers ----------------------------------------------


@pytest.mark.integration
def test_invalid_spec_queues_nothing_on_the_real_broker(cluster):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    from megaflow.bench.floors import wait_for_worker

    for w in workers.values():
        wait_for_worker(client.app, w.name)  # queues declared
    for bad, _ in BAD_SPECS[:10]:
        with pytest.raises(SpecError):
            client.submit(bad)
    with client.session() as s:
        assert s.execute(select(func.count()).select_from(Run)).scalar() == 0
        assert s.execute(select(func.count()).select_from(Episode)).scalar() == 0
    assert _depths(client.app, ["agent", "model", "env", f"env.{HOST}"]) == [0, 0, 0, 0]


#: How many malformed messages the test sends (docs/benchmarks.md counts them).
MALFORMED_MESSAGES = 10


@pytest.mark.integration
def test_malformed_messages_on_every_queue_are_dead_lettered_and_workers_go_on(cluster, tmp_path):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    from megaflow.bench.floors import wait_for_worker

    for w in workers.values():
        wait_for_worker(client.app, w.name)
    marker = tmp_path / "pickle-ran"
    messages = malformed_messages(client.app, HOST, marker)
    assert len(messages) == MALFORMED_MESSAGES
    publish(settings.broker_url, messages)
    dead = _wait_dead(client.app, len(messages), timeout=60)
    assert sorted(q for q in dead) == sorted(q for q, _ in messages), dead
    assert not marker.exists(), "a pickled message was unpickled"
    for name, w in workers.items():
        assert w.alive(), f"{name} worker died on a malformed message"
    logs = "".join(w.log_path.read_text(errors="replace") for w in workers.values())
    assert "dead-lettered" in logs or "Received unregistered task" in logs
    # The queues are empty again and the workers keep working.
    assert _depths(client.app, ["agent", "model", "env", f"env.{HOST}"]) == [0, 0, 0, 0]
    run_id = client.submit({"name": "after", "model": {"type": "scripted"}, "sandbox": {"type": "memory"},
                            "tasks": [TASK]})
    assert client.wait(run_id, timeout=60)["by_state"] == {"succeeded": 1}


@pytest.mark.integration
def test_poison_task_is_capped_by_its_delivery_limit(cluster):
    """A hop that kills its worker every time ends its episode infra_failed at its 3rd delivery (limit 2)."""
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit({"name": "poison", "model": {"type": "scripted", "latency_s": 4.0},
                            "sandbox": {"type": "memory"}, "tasks": [TASK]})
    deadline = time.monotonic() + 150
    kills = 0
    seen = -1
    while True:
        assert time.monotonic() < deadline, "poison loop did not stop"
        st = client.status(run_id)
        if st["status"] == "finished":
            break
        with client.session() as s:
            count = s.execute(select(func.max(Delivery.count)).where(
                Delivery.task_name == "megaflow.hop.generate")).scalar() or 0
            started = s.execute(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                                .where(Episode.run_id == run_id)).scalar()
        # Kill the model worker each time a delivery of the call is under way (first one: not yet counted);
        # the third delivery is past the limit of 2 and ends the episode.
        if started and count > seen and count <= 1:
            time.sleep(1.0)
            workers["model"].kill()
            kills += 1
            seen = count
            workers["model"] = WorkerProcess("model", settings, name=f"bad-model{kills}",
                                             extra_env={"MEGAFLOW_HOP_MAX_DELIVERIES": "2"}).start()
        time.sleep(0.2)
    assert kills == 2
    [row] = client.results(run_id)
    assert row["state"] == "infra_failed" and row["exit_status"] == "poison", row
    events = client.events(run_id)
    assert events["run.done"] == 1
    with client.session() as s:
        poison = s.execute(select(Event.data).where(Event.kind == "task.poison")).scalars().all()
    assert poison and poison[0]["task"] == "megaflow.hop.generate" and poison[0]["deliveries"] == 3


@pytest.mark.integration
def test_nul_bytes_in_output_are_stored_not_fatal(cluster):
    settings = cluster.settings
    client = Client(settings)
    run_id = client.submit({"name": "nul", "sandbox": {"type": "local"},
                            "model": {"type": "scripted", "replies": ["```bash\nprintf 'a\\0b'\n```",
                                                                      "```bash\nsubmit\n```"]},
                            "tasks": [TASK]})
    assert client.wait(run_id, timeout=90)["by_state"] == {"succeeded": 1}
    with client.session() as s:
        obs = s.execute(select(Step.observation).join(Episode, Episode.id == Step.episode_id)
                        .where(Episode.run_id == run_id, Step.index == 0)).scalar()
    assert obs == "a\ufffdb"


def _depths(app, queues: list[str]) -> list[int]:
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        return [ch.queue_declare(q, passive=True)[1] for q in queues]


def _wait_dead(app, n: int, timeout: float) -> list[str]:
    """Wait for `n` messages in megaflow.dead; return the queue each was dead-lettered from."""
    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        while ch.queue_declare("megaflow.dead", passive=True)[1] < n:
            assert time.monotonic() < deadline, f"only {ch.queue_declare('megaflow.dead', passive=True)[1]} of {n} " \
                                                "malformed messages were dead-lettered"
            time.sleep(0.3)
    time.sleep(1.0)  # nothing more should follow
    return dead_letters(app)
