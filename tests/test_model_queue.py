"""Episodes through the model queue and a real model worker, against real models.

* the transformers backend (SmolLM2) loaded inside the model worker;
* the OpenAI HTTP backend against the real server of `megaflow.model.server`;
* a prompt past the context: a clear error, the episode failed, no retry loop;
* a refused port and a server answering 503: retried with backoff, then infra_failed.

Real RabbitMQ and PostgreSQL; skips without them or without torch and the weights,
and fails instead under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import need
from sqlalchemy import select

from megaflow import Client
from megaflow.db.models import Episode, Event, Hop, Step
from megaflow.model.server import free_port
from megaflow.model.smollm import GGUF_FILE, INSTALL_HINT, smollm2_available

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="mq-host")]

TASK = {"instance_id": "hello", "instruction": "Print hello.", "check": "true"}


def need_smollm2() -> None:
    for package in ("torch", "transformers", "gguf"):
        need(package, importlib.util.find_spec(package) is not None, "install the model packages")
    need("SmolLM2 weights", smollm2_available(), INSTALL_HINT)


def spec(model: dict, tasks: list[dict], rollouts: int = 1, **limits) -> dict:
    return {"name": "model-queue", "rollouts": rollouts, "model": model, "sandbox": {"type": "memory"},
            "limits": {"max_steps": 2, **limits}, "tasks": tasks}


def episodes(client: Client, run_id: str) -> list[Episode]:
    with client.session() as s:
        return list(s.execute(select(Episode).where(Episode.run_id == run_id)).scalars())


def model_steps(client: Client, run_id: str) -> list[Step]:
    with client.session() as s:
        ids = select(Episode.id).where(Episode.run_id == run_id)
        return list(s.execute(select(Step).where(Step.episode_id.in_(ids), Step.completion.is_not(None))).scalars())


def assert_real_completions(steps: list[Step], max_tokens: int, version: str) -> None:
    assert steps, "no model call completed"
    for st in steps:
        assert st.completion is not None and st.model == "smollm2" and st.model_version == version
        assert 0 < st.completion_tokens <= max_tokens and st.prompt_tokens > 50
        assert st.finish_reason in ("stop", "length")
        assert len(st.token_ids) == len(st.logprobs) == st.completion_tokens
        assert all(isinstance(t, int) for t in st.token_ids)
        assert all(lp <= 1e-4 for lp in st.logprobs) and any(lp < 0 for lp in st.logprobs)


def test_transformers_model_in_the_model_worker(cluster):
    need_smollm2()
    client = cluster.client
    model = {"type": "transformers", "max_batch_size": 4, "max_wait_ms": 200, "sampling": {"max_tokens": 6}}
    run_id = client.submit(spec(model, [TASK], rollouts=2))
    st = client.wait(run_id, timeout=300)
    assert st["status"] == "finished"
    assert set(st["by_state"]) <= {"failed", "succeeded"}, st  # what the agent made of it; no infra failure
    assert_real_completions(model_steps(client, run_id), 6, GGUF_FILE)
    # Both rollouts asked the same thing of a greedy model: the same answer.
    first = {(s.index, s.completion, tuple(s.token_ids)) for s in model_steps(client, run_id) if s.index == 0}
    assert len(first) == 1


def test_openai_backend_against_the_real_server(cluster):
    """One normal task, and one whose prompt is past the server's context."""
    need_smollm2()
    from megaflow.model.server import openai_server

    client, workers = cluster.client, cluster.workers
    with openai_server(context_tokens=512, version="smol-v1") as url:
        model = {"type": "openai", "model": "smollm2", "endpoints": [url], "max_retries": 1,
                 "sampling": {"max_tokens": 6}}
        long_task = {"instance_id": "long", "instruction": "lorem " * 3000, "check": "true"}
        run_id = client.submit(spec(model, [TASK, long_task]))
        st = client.wait(run_id, timeout=300)
    assert st["status"] == "finished"
    by_task = {e.task_instance_id: e for e in episodes(client, run_id)}
    steps = model_steps(client, run_id)
    assert_real_completions(steps, 6, "smol-v1")

    with client.session() as s:
        from megaflow.db.models import TaskInstance

        long_id = s.execute(select(TaskInstance.id).where(TaskInstance.run_id == run_id,
                                                          TaskInstance.instance_id == "long")).scalar_one()
        long_ep = by_task[long_id]
        hops = s.execute(select(Hop).where(Hop.subject_id == long_ep.id, Hop.hop == "generate")).scalars().all()
        retries = s.execute(select(Event).where(Event.kind == "hop.retry", Event.subject_id == long_ep.id)).all()
        poison = s.execute(select(Event).where(Event.kind == "task.poison")).scalars().all()
    assert (long_ep.state, long_ep.exit_status) == ("failed", "context_length")
    assert "maximum context length is 512 tokens" in long_ep.error
    # The step's model call was tried once, recorded once with its error: no retry loop.
    assert len(hops) == 1 and retries == [] and hops[0].step_index == 0
    assert hops[0].result["kind"] == "agent" and "maximum context length" in hops[0].result["error"]
    assert not poison
    assert workers["model"].alive()
    assert all(s.episode_id != long_ep.id for s in steps)


class _Failing:
    """An HTTP server that answers every request 503 and counts them."""

    def __init__(self):
        self.count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.count += 1
                data = json.dumps({"error": {"message": "overloaded"}}).encode()
                self.send_response(503)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_unavailable_server_is_retried_then_infra_failed(cluster):
    client, workers = cluster.client, cluster.workers
    failing = _Failing()
    try:
        runs = {}
        for name, url in (("refused", f"http://127.0.0.1:{free_port()}/v1"), ("503", failing.url)):
            model = {"type": "openai", "model": "m", "endpoints": [url], "max_retries": 1, "timeout_s": 5}
            runs[name] = client.submit(spec(model, [TASK], model_retries=2, model_retry_backoff_s=0.2))
        for run_id in runs.values():
            assert client.wait(run_id, timeout=60)["status"] == "finished"
    finally:
        failing.close()
    # The hop ran three times (two retries), each time the client tried twice.
    assert failing.count == 3 * 2
    refused = [line for line in workers["model"].log_path.read_text().splitlines()
               if "Connection refused" in line and "retry 1 in" in line]
    assert len(refused) == 3, refused
    for name, run_id in runs.items():
        [ep] = episodes(client, run_id)
        assert (ep.state, ep.exit_status) == ("infra_failed", "model_unavailable"), name
        assert "unavailable after 2 tries" in ep.error
        with client.session() as s:
            hop = s.execute(select(Hop).where(Hop.subject_id == ep.id, Hop.hop == "generate")).scalar_one()
        assert hop.result["kind"] == "infra"
