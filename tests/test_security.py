"""Credentials stay out of logs, events, trajectories and exports; agent commands never run on
the host. Through real workers on the real RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from sqlalchemy import select
from test_model_openai import fake_servers

from megaflow import Client
from megaflow.db.models import Episode, Event, Step
from megaflow.redact import MASK, find_secrets, install_log_redaction, redact, redact_text, register_secret

SECRET = "sk-test-" + uuid.uuid4().hex  # the model API key the workers hold
FLOWER = "ops:flower-" + uuid.uuid4().hex[:12]
HOST = "sec-host"

pytestmark = pytest.mark.cluster(host=HOST, name="sec-", env={
    "MF_TEST_API_KEY": SECRET, "MEGAFLOW_FLOWER_BASIC_AUTH": FLOWER, "MEGAFLOW_WORKER_CONCURRENCY": "4"})

TASK = {"instance_id": "t", "instruction": "look around", "check": "true"}


def test_redaction_masks_credential_formats_and_known_values():
    register_secret("plain-but-registered-value")
    text = ("key sk-ant-" + "a" * 30 + " ghp_" + "b" * 36 + " AKIA" + "C" * 16 + " hf_" + "d" * 34 +
            " Authorization: Bearer abc.def.ghi-123456 url amqp://user:pa55word@rabbit:5672// "
            "password=hunter2hunter2 plain-but-registered-value\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\n"
            "-----END RSA PRIVATE KEY-----")
    out = redact_text(text)
    for leaked in ("a" * 30, "b" * 36, "C" * 16, "d" * 34, "abc.def.ghi", "pa55word", "hunter2hunter2",
                   "plain-but-registered-value", "MIIE"):
        assert leaked not in out, out
    assert "amqp://user:***@rabbit" in out and "Bearer ***" in out
    # Code in exports keeps its assignments; only credential formats go.
    assert redact_text("password = get_password()", assignments=False) == "password = get_password()"
    assert redact({"api_key": "x" * 10, "max_tokens": 5, "n": [SECRET]}) == {"api_key": MASK, "max_tokens": 5,
                                                                          "n": [MASK]}
    assert find_secrets({"model": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 5}}) == []


def test_log_records_are_redacted_in_this_process(caplog):
    install_log_redaction({"SOME_SERVICE_TOKEN": "tok-" + "z" * 20})
    log = logging.getLogger("megaflow.test.redaction")
    with caplog.at_level(logging.INFO):
        log.info("connecting with %s to %s", "tok-" + "z" * 20, "postgresql://u:dbpass99@h/db")
        try:
            raise RuntimeError(f"server said: invalid key {SECRET}")
        except RuntimeError:
            log.exception("call failed")
    assert "z" * 20 not in caplog.text and "dbpass99" not in caplog.text and SECRET not in caplog.text
    assert MASK in caplog.text


@pytest.fixture
def info_logs(monkeypatch):
    """Workers log at INFO (set before `cluster` starts them), so the logs have lines to leak into."""
    monkeypatch.setenv("MEGAFLOW_LOG_LEVEL", "INFO")


def _model_server():
    """A fake OpenAI server: echoes the key it was sent in errors, then drives a nosy agent."""
    calls: dict[str, int] = {}

    def reply(body: dict):
        model = body["model"]
        n = calls[model] = calls.get(model, 0) + 1
        key = f"your key was {SECRET}"
        if model == "deny":
            return 401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
        if n == 1:
            return 500, {"error": f"upstream failed; {key}"}
        turns = body["messages"]
        n_assistant = sum(1 for m in turns if m["role"] == "assistant")
        commands = ["env; echo key=$MF_TEST_API_KEY; cat /proc/1/environ 2>&1 | tr '\\0' '\\n'",
                    "cat /proc/self/status | grep -i uid; ls /root 2>&1; cat /etc/shadow 2>&1", "submit"]
        text = f"```bash\n{commands[min(n_assistant, 2)]}\n```"
        return 200, {"model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    return reply


def _spec(name: str, url: str, model: str) -> dict:
    return {"name": name, "sandbox": {"type": "local"}, "tasks": [TASK],
            "model": {"type": "openai", "model": model, "endpoints": [url], "api_key_env": "MF_TEST_API_KEY",
                      "max_retries": 2}}


@pytest.mark.integration
def test_credentials_never_reach_logs_events_trajectories_or_exports(info_logs, cluster, tmp_path):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    with fake_servers(_model_server()) as [server]:
        ok = client.submit(_spec("nosy", server.url, "ok"))
        denied = client.submit(_spec("denied", server.url, "deny"))
        assert client.wait(ok, timeout=120)["by_state"] == {"succeeded": 1}
        assert client.wait(denied, timeout=120)["by_state"] == {"infra_failed": 1}
    # The key was used: the server saw it on every request.
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)

    with client.session() as s:
        episodes = s.execute(select(Episode.error, Episode.exit_status)).all()
        events = [json.dumps(d) for d in s.execute(select(Event.data)).scalars()]
        steps = s.execute(select(Step.observation, Step.completion, Step.action)).all()
    texts = {"episodes": json.dumps([list(e) for e in episodes]), "events": "\n".join(events),
             "steps": json.dumps([list(x) for x in steps])}
    for run_id in (ok, denied):
        out = tmp_path / f"{run_id}.jsonl"
        client.export(run_id, "jsonl", out)
        texts[f"export {run_id}"] = out.read_text()
    texts["logs"] = "".join(w.log_path.read_text(errors="replace") for w in workers.values())
    flower_password = FLOWER.split(":", 1)[1]
    for where, text in texts.items():
        assert SECRET not in text, f"the API key leaked into {where}"
        assert flower_password not in text, f"the Flower password leaked into {where}"
    # Not vacuous: the key was in an error (the 401), in a log line (the retried 500), and masked there.
    assert MASK in texts["episodes"] and MASK in texts["logs"]
    # The sandbox saw none of the worker's environment.
    observations = " ".join(o or "" for o, _, _ in steps)
    assert "key=\n" in observations or "key=" in observations
    assert "MF_TEST_API_KEY" not in observations and "MEGAFLOW_" not in observations


@pytest.mark.integration
@pytest.mark.parametrize("sandbox", ["local", "memory"])
def test_agent_commands_never_run_on_the_host(info_logs, cluster, tmp_path, sandbox):
    settings = cluster.settings
    client = Client(settings)
    target = tmp_path / f"escaped-{sandbox}"
    host_tmp = f"/tmp/megaflow-escape-{uuid.uuid4().hex}"
    replies = [f"```bash\ntouch {target}; echo done > {host_tmp}; id -u\n```",
               f"```bash\nls {tmp_path} 2>&1; cat /etc/shadow 2>&1 | head -c 40\n```", "```bash\nsubmit\n```"]
    run_id = client.submit({"name": f"escape-{sandbox}", "sandbox": {"type": sandbox}, "tasks": [TASK],
                            "model": {"type": "scripted", "replies": replies}})
    assert client.wait(run_id, timeout=120)["by_state"] == {"succeeded": 1}
    import os

    assert not target.exists() and not os.path.exists(host_tmp), "an agent command wrote on the host"
    with client.session() as s:
        obs = s.execute(select(Step.observation).join(Episode, Episode.id == Step.episode_id)
                        .where(Episode.run_id == run_id).order_by(Step.index)).scalars().all()
    if sandbox == "local":
        assert obs[0].splitlines()[0] == "1000"  # the agent's uid inside, never the worker's
    assert "root:" not in obs[1]  # no host /etc/shadow
