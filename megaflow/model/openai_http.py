"""OpenAI-compatible chat completions over HTTP: vLLM, SGLang, hosted APIs, our `serve`.

* One sync `httpx.Client` per endpoint, with `max_connections` as its pool limit, so
  one slow endpoint cannot starve the others of connections.
* Each call goes to the endpoint with the fewest requests in flight from this client
  (least outstanding requests); a retry prefers an endpoint other than the one that
  just failed.
* 5xx, 429, refused connections and timeouts are retried here with exponential backoff
  and jitter, `max_retries` times, then raised as `ModelUnavailableError`. A 400 saying
  the context is too long is `ContextLengthError` at once. A 200 that is not a chat
  completion is `MalformedResponseError`, raised at once: retrying it belongs to the
  caller (Celery, through `should_retry`), with its own, longer backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from typing import Any

import httpx

from megaflow.errors import (
    ContextLengthError,
    InfraError,
    MalformedResponseError,
    ModelError,
    ModelUnavailableError,
)
from megaflow.model.base import Completion, ModelRequest, Usage, check_tool_calls
from megaflow.model.config import OpenAIModelConfig
from megaflow.model.policy import PolicyRef
from megaflow.model.weights import load_hook, update_server

logger = logging.getLogger(__name__)

#: How servers say a prompt is too long: vLLM, SGLang, OpenAI, llama.cpp, TGI.
_CONTEXT_RE = re.compile(
    r"context.length|context_length_exceeded|maximum context|longer than the model|"
    r"prompt is too long|too many tokens|exceeds? the (?:model|context)",
    re.IGNORECASE,
)
#: vLLM's `return_tokens_as_token_ids` writes tokens as "token_id:123".
_TOKEN_ID_RE = re.compile(r"^token_id:(\d+)$")
_RETRY_STATUS = {408, 409, 425, 429}


def should_retry(exc: BaseException) -> bool:
    """Whether a failed model call is worth retrying (for Celery's `autoretry_for`).

    True for infrastructure failures (server down, timeouts, 5xx, malformed answers);
    False for failures that a retry would repeat (prompt too long, 4xx, bugs).
    """
    if isinstance(exc, ContextLengthError):
        return False
    if isinstance(exc, InfraError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return _retryable_status(exc.response.status_code)
    return isinstance(exc, (httpx.TransportError, TimeoutError, ConnectionError))


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in _RETRY_STATUS


class _ServerBusy(ModelUnavailableError):
    """A 5xx or 429; the server may say when to come back."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _LeastOutstanding:
    """Picks the endpoint with the fewest requests in flight; thread-safe."""

    def __init__(self, n: int):
        self._outstanding = [0] * n
        self._lock = threading.Lock()
        self._next = 0

    def acquire(self, avoid: int | None = None) -> int:
        with self._lock:
            n = len(self._outstanding)
            # Ties go round-robin, so idle endpoints share a light load evenly.
            order = [(self._next + k) % n for k in range(n)]
            if avoid is not None and n > 1:
                order.remove(avoid)
            best = min(order, key=lambda i: self._outstanding[i])
            self._outstanding[best] += 1
            self._next = (best + 1) % n
            return best

    def release(self, index: int) -> None:
        with self._lock:
            self._outstanding[index] -= 1

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self._outstanding)


class OpenAIModel:
    """A `ModelClient` for OpenAI-compatible `/chat/completions` endpoints.

    Thread-safe. Connections open on first use and `close()` releases them.

    Args:
        config: Endpoints, model name, limits, retries, API key env var.
        backoff_s: First retry delay; doubles per retry, with jitter.
        backoff_max_s: Cap on one retry delay.
    """

    def __init__(self, config: OpenAIModelConfig, *, backoff_s: float = 0.5, backoff_max_s: float = 10.0):
        self.config = config
        self.name = config.model
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.endpoints = [e.rstrip("/") for e in config.endpoints]
        self.balancer = _LeastOutstanding(len(self.endpoints))
        self._clients: list[httpx.Client | None] = [None] * len(self.endpoints)
        self._lock = threading.Lock()
        self._api_key: str | None = None
        #: (model name requests name, policy version it serves): swapped whole, read once per request.
        self._serving: tuple[str, int] = (config.model, 0)
        self._policy_lock = threading.Lock()
        if config.api_key_env:
            self._api_key = os.environ.get(config.api_key_env)
            if not self._api_key:
                raise ValueError(f"environment variable {config.api_key_env} (the API key) is not set")

    def generate(self, request: ModelRequest) -> Completion:
        """POST one chat completion, retrying infrastructure failures.

        Raises:
            ContextLengthError: the server said the prompt is too long.
            ModelUnavailableError: every try failed with 5xx, 429, a refusal or a timeout.
            MalformedResponseError: the server answered 2xx with no valid completion.
            ModelError: any other 4xx (bad model name, bad key): not retried.
        """
        body = self._body(request)
        served, version = self._serving
        body["model"] = served
        started = time.monotonic()
        # The call's deadline covers every try and every backoff sleep.
        deadline = started + request.timeout_s if request.timeout_s is not None else None
        avoid: int | None = None
        for attempt in range(self.config.max_retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ModelUnavailableError(f"model {self.name!r}: no answer within the call's "
                                            f"{request.timeout_s:g}s deadline ({attempt} tries)")
            index = self.balancer.acquire(avoid)
            try:
                data = self._post(index, body, request.request_id, left)
            except ModelUnavailableError as exc:
                error = exc
            else:
                completion = self._completion(data, request, time.monotonic() - started)
                completion.policy_version = version
                return completion
            finally:
                self.balancer.release(index)  # before any backoff: a sleeping retry is not in flight
            avoid = index
            if attempt >= self.config.max_retries:
                raise ModelUnavailableError(
                    f"model {self.name!r} unavailable after {attempt + 1} tries: {error}"
                ) from error
            delay = self._delay(attempt, getattr(error, "retry_after", None))
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - time.monotonic()))
            logger.warning(
                "model call to %s failed (%s); retry %d in %.2fs", self.endpoints[index], error, attempt + 1, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    @property
    def policy_version(self) -> int:
        return self._serving[1]

    def load_policy(self, ref: PolicyRef) -> None:
        """Have the servers serve a published version, then name it in every later request.

        Through the serving engine's own update API (`config.weight_sync`, see
        `megaflow.model.weights.update_server`), on every endpoint, or the user's hook.
        Requests already sent finish on what the server had; a LoRA version is a new
        adapter name, so no request ever mixes two. Blocks until every server answered.

        Raises:
            ModelUnavailableError: a server refused or failed (the model hop retries).
        """
        with self._policy_lock:
            if ref.version <= self._serving[1]:
                return
            sync = self.config.weight_sync
            if sync.startswith("hook:"):
                name = load_hook(sync.removeprefix("hook:"))(ref, list(self.endpoints))
            else:
                for index in range(len(self.endpoints)):
                    name = update_server(self._client(index), sync, ref)
                if name is not None and sync == "sglang":
                    name = f"{self.config.model}:{name}"  # SGLang names an adapter after its base model
            self._serving = (name or self.config.model, ref.version)
            logger.info("serving policy %s version %d as %r", ref.policy, ref.version, self._serving[0])

    def close(self) -> None:
        """Close every connection pool. Idempotent; a later call reopens them."""
        with self._lock:
            clients, self._clients = self._clients, [None] * len(self.endpoints)
        for client in clients:
            if client is not None:
                client.close()

    # -- one HTTP exchange -----------------------------------------------------

    def _client(self, index: int) -> httpx.Client:
        client = self._clients[index]
        if client is None:
            with self._lock:
                client = self._clients[index]
                if client is None:
                    client = self._clients[index] = self._make_client(self.endpoints[index])
        return client

    def _make_client(self, base_url: str) -> httpx.Client:
        n = self.config.max_connections
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        return httpx.Client(
            base_url=base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            # Connecting should be quick; generating may take the whole budget.
            timeout=httpx.Timeout(self.config.timeout_s, connect=min(10.0, self.config.timeout_s)),
        )

    def _post(self, index: int, body: dict, request_id: str, left: float | None = None) -> Any:
        """One POST, within `left` seconds when given. Retryable failures become `ModelUnavailableError`."""
        headers = {"X-Request-ID": request_id} if request_id else {}
        extra = {}
        if left is not None and left < self.config.timeout_s:
            extra["timeout"] = httpx.Timeout(left, connect=min(10.0, left))
        try:
            response = self._client(index).post("/chat/completions", json=body, headers=headers, **extra)
        except httpx.TimeoutException as exc:
            raise ModelUnavailableError(f"timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise ModelUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if _retryable_status(status):
            raise _ServerBusy(f"HTTP {status}: {response.text[:300]}", _retry_after(response))
        if status >= 400:
            text = response.text[:1000]
            if status in (400, 413, 422) and _CONTEXT_RE.search(text):
                raise ContextLengthError(f"HTTP {status}: {text}")
            raise ModelError(f"HTTP {status} from {self.endpoints[index]}: {text}")
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedResponseError(f"answer is not JSON: {response.text[:300]!r}") from exc

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_s * 2**attempt)
        # Half fixed, half random: spreads the clients that failed together.
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    # -- JSON in and out -------------------------------------------------------

    def _body(self, request: ModelRequest) -> dict:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [m.wire() for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.stop:
            body["stop"] = s.stop
        if s.seed is not None:
            body["seed"] = s.seed
        if s.logprobs:
            body["logprobs"] = True
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
        return body

    def _completion(self, data: Any, request: ModelRequest, latency_s: float) -> Completion:
        try:
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            usage = data.get("usage") or {}
            finish = choice.get("finish_reason") or "stop"
            model = data.get("model") or self.name
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            tool_calls = check_tool_calls(_tool_calls(message.get("tool_calls")))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise MalformedResponseError(f"not a chat completion ({exc!r}): {str(data)[:300]}") from exc
        logprobs, token_ids = _parse_logprobs(choice) if request.sampling.logprobs else (None, None)
        if isinstance(choice.get("token_ids"), list):  # vLLM's `return_token_ids`
            token_ids = [int(t) for t in choice["token_ids"]]
        return Completion(
            text=text,
            tool_calls=tool_calls,
            finish_reason=str(finish),
            token_ids=token_ids,
            logprobs=logprobs,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            latency_s=latency_s,
            model=str(model),
            # The config's tag wins; else the server's fingerprint (our `serve` puts the weights there).
            model_version=self.config.version or str(data.get("system_fingerprint") or ""),
            prompt_token_ids=_ints(data.get("prompt_token_ids")),  # vLLM's `return_token_ids`, our `serve`
        )


def _ints(value: Any) -> list[int] | None:
    return [int(v) for v in value] if isinstance(value, list) else None


def _tool_calls(calls: Any) -> list[dict] | None:
    """A message's tool calls in the OpenAI shape; servers that send arguments as an object get them encoded."""
    if not calls:
        return None
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), dict):
            call = {**call, "function": {**fn, "arguments": json.dumps(fn["arguments"])}}
        out.append(call)
    return out


def _parse_logprobs(choice: dict) -> tuple[list[float] | None, list[int] | None]:
    """Token logprobs (and ids, where the server writes them) from `choice.logprobs`.

    Servers that ignore `logprobs: true` give nothing, and that is no error.
    """
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list):
        return None, None
    try:
        logprobs = [float(item["logprob"]) for item in content]
    except (KeyError, TypeError, ValueError):
        logger.warning("ignoring unreadable logprobs in a completion")
        return None, None
    ids = [_TOKEN_ID_RE.match(str(item.get("token", ""))) for item in content]
    token_ids = [int(m.group(1)) for m in ids] if ids and all(ids) else None
    return logprobs, token_ids


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from model servers, and the backoff covers it
