"""The OpenAI-compatible HTTP client: against a real model server (conformance), and
against small fake servers on 127.0.0.1 for retries, errors and balancing."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import need

from megaflow.errors import ContextLengthError, MalformedResponseError, ModelError, ModelUnavailableError
from megaflow.model.base import Message, ModelRequest, SamplingParams
from megaflow.model.config import OpenAIModelConfig
from megaflow.model.conformance import CHECKS
from megaflow.model.openai_http import OpenAIModel, should_retry
from megaflow.model.server import free_port, openai_server
from megaflow.model.smollm import INSTALL_HINT, smollm2_available

OK_BODY = {
    "model": "fake",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "stop",
            "logprobs": {"content": [{"token": "hel", "logprob": -0.5}, {"token": "lo", "logprob": -0.25}]},
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
}

# A reply: (status, body) where a dict body is sent as JSON, or a callable run first.
Reply = tuple[int, object]


class FakeServer:
    """An HTTP server on 127.0.0.1 answering /v1/chat/completions from a script."""

    def __init__(self, replies: list[Reply] | Callable[[dict], Reply]):
        self.replies = replies
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    if callable(fake.replies):
                        reply = None
                    else:
                        reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                status, payload = reply if reply is not None else fake.replies(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@contextmanager
def fake_servers(*scripts) -> Iterator[list[FakeServer]]:
    servers = [FakeServer(s) for s in scripts]
    threads = [threading.Thread(target=s.httpd.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield servers
    finally:
        for s in servers:
            s.httpd.shutdown()
            s.httpd.server_close()


def _client(*urls: str, **config) -> OpenAIModel:
    config.setdefault("max_retries", 3)
    return OpenAIModel(OpenAIModelConfig(model="fake", endpoints=list(urls), **config), backoff_s=0.01)


def _ask(content: str = "hi", **sampling) -> ModelRequest:
    return ModelRequest(messages=[Message(role="user", content=content)], sampling=SamplingParams(**sampling))


# -- against a real model server ---------------------------------------------


@pytest.fixture(scope="module")
def served_model():
    for package in ("torch", "transformers", "gguf"):
        need(package, importlib.util.find_spec(package) is not None, "install the model packages")
    need("SmolLM2 weights", smollm2_available(), INSTALL_HINT)
    with openai_server(max_wait_ms=100.0, version="smol-test") as url:
        client = OpenAIModel(OpenAIModelConfig(model="smollm2", endpoints=[url], timeout_s=60.0))
        yield client
        client.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance_over_http(served_model, check):
    check(served_model)


@pytest.mark.integration
@pytest.mark.slow
def test_real_server_gives_tokens_logprobs_and_version(served_model):
    c = served_model.generate(_ask("Say hi.", max_tokens=4))
    assert c.model_version == "smol-test"
    assert len(c.token_ids) == len(c.logprobs) == c.usage.completion_tokens
    assert all(lp <= 0 for lp in c.logprobs)


# -- retries and errors against fake servers ---------------------------------


def test_5xx_is_retried_until_success():
    with fake_servers([(503, {"error": "busy"}), (500, {"error": "oops"}), (200, OK_BODY)]) as [server]:
        c = _client(server.url).generate(_ask())
    assert c.text == "hello" and len(server.requests) == 3


def test_5xx_forever_ends_unavailable():
    with fake_servers([(502, {"error": "bad gateway"})]) as [server], pytest.raises(ModelUnavailableError):
        _client(server.url, max_retries=2).generate(_ask())
    assert len(server.requests) == 3


def test_refused_port_ends_unavailable_after_retries():
    client = _client(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="after 3 tries") as info:
        client.generate(_ask())
    assert time.monotonic() - started < 5
    assert should_retry(info.value)


def test_timeout_ends_unavailable():
    def slow(body):
        time.sleep(1.0)
        return 200, OK_BODY

    with fake_servers(slow) as [server], pytest.raises(ModelUnavailableError, match="timed out"):
        _client(server.url, timeout_s=0.2, max_retries=1).generate(_ask())
    assert len(server.requests) == 2


def test_context_length_400_is_not_retried():
    message = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
    reply = (400, {"error": {"message": message}})
    with fake_servers([reply]) as [server], pytest.raises(ContextLengthError) as info:
        _client(server.url).generate(_ask())
    assert len(server.requests) == 1 and not should_retry(info.value)


def test_other_4xx_is_not_retried():
    with fake_servers([(404, {"error": "model not found"})]) as [server], pytest.raises(ModelError) as info:
        _client(server.url).generate(_ask())
    assert len(server.requests) == 1 and not should_retry(info.value)


@pytest.mark.parametrize(
    "payload",
    [b"not json", {"id": "x"}, {"choices": []}, {"choices": [{"text": "legacy"}]}],
    ids=["not-json", "no-choices", "empty-choices", "no-message"],
)
def test_malformed_answers(payload):
    with fake_servers([(200, payload)]) as [server], pytest.raises(MalformedResponseError) as info:
        _client(server.url).generate(_ask())
    assert should_retry(info.value)  # by the caller, with its own backoff


def test_logprobs_asked_and_parsed_or_tolerated():
    plain = json.loads(json.dumps(OK_BODY))
    plain["choices"][0].pop("logprobs")
    with fake_servers([(200, OK_BODY), (200, plain)]) as [server]:
        client = _client(server.url)
        with_lp = client.generate(_ask(logprobs=True, stop=["\n"], seed=3))
        without = client.generate(_ask(logprobs=True))
    assert server.requests[0]["logprobs"] is True
    assert server.requests[0]["stop"] == ["\n"] and server.requests[0]["seed"] == 3
    assert with_lp.logprobs == [-0.5, -0.25] and with_lp.usage.completion_tokens == 2
    assert without.logprobs is None and without.text == "hello"


def test_api_key_is_sent_and_never_logged(monkeypatch, caplog):
    secret = "sk-test-5ecret-value"
    monkeypatch.setenv("MEGAFLOW_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with fake_servers([(503, {"error": "busy"}), (200, OK_BODY)]) as [server]:
        _client(server.url, api_key_env="MEGAFLOW_TEST_KEY").generate(_ask())
    assert server.headers[-1]["Authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text


def test_missing_api_key_fails_at_construction(monkeypatch):
    monkeypatch.delenv("MEGAFLOW_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MEGAFLOW_TEST_KEY"):
        _client("http://127.0.0.1:9/v1", api_key_env="MEGAFLOW_TEST_KEY")


def test_should_retry_classifies_raw_errors():
    request = httpx.Request("POST", "http://127.0.0.1/")
    assert should_retry(httpx.ConnectError("refused", request=request))
    assert should_retry(httpx.HTTPStatusError("", request=request, response=httpx.Response(503)))
    assert should_retry(httpx.HTTPStatusError("", request=request, response=httpx.Response(429)))
    assert not should_retry(httpx.HTTPStatusError("", request=request, response=httpx.Response(401)))
    assert not should_retry(ValueError("bug"))


# -- balancing ---------------------------------------------------------------


def test_least_outstanding_balancing():
    gate = threading.Event()

    def script(body):
        if body["messages"][0]["content"] == "hold":
            gate.wait(10)
        return 200, OK_BODY

    with fake_servers(script, script) as servers:
        client = _client(*(s.url for s in servers))
        held = threading.Thread(target=client.generate, args=(_ask("hold"),))
        held.start()
        deadline = time.monotonic() + 5
        while not any(s.requests for s in servers) and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = next(i for i, s in enumerate(servers) if s.requests)
        for _ in range(5):
            client.generate(_ask("quick"))
        gate.set()
        held.join(10)
    assert len(servers[busy].requests) == 1  # only the held call
    assert len(servers[1 - busy].requests) == 5
    assert client.balancer.snapshot() == [0, 0]


def test_idle_endpoints_share_load_and_retry_moves_on():
    with fake_servers([(200, OK_BODY)], [(200, OK_BODY)]) as servers:
        client = _client(*(s.url for s in servers))
        for _ in range(6):
            client.generate(_ask())
    assert [len(s.requests) for s in servers] == [3, 3]

    with fake_servers([(503, {"error": "down"})], [(200, OK_BODY)]) as servers:
        client = _client(*(s.url for s in servers))
        for _ in range(4):
            assert client.generate(_ask()).text == "hello"
    assert len(servers[0].requests) <= 4 and len(servers[1].requests) == 4
