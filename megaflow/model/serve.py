"""A small OpenAI-compatible server backed by `TransformersModel`.

    python -m megaflow.model.serve --model smollm2 --port 8000

Serves `POST /v1/chat/completions`, `GET /v1/models` and `GET /health` from the
standard library's threading HTTP server: one thread per connection, which is just
what the dynamic batcher wants, since concurrent requests then share batches.

It exists because `transformers serve` cannot load the shipped GGUF (its config has no
`architectures`) and answers neither `logprobs` nor an over-long prompt the way vLLM
does. This one answers both as vLLM does (`choice.logprobs.content`, `choice.token_ids`,
a 400 "maximum context length" error), so the HTTP client's whole contract can be tested
against a real model on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Completion, Message, ModelRequest, SamplingParams
from megaflow.model.config import TransformersModelConfig
from megaflow.model.hf import TransformersModel
from megaflow.model.policy import PolicyRef

logger = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024


def parse_request(body: dict[str, Any]) -> ModelRequest:
    """Turn an OpenAI chat-completions body into a `ModelRequest`; unknown fields are ignored.

    Raises:
        ValueError: a field is missing or invalid.
    """
    stop = body.get("stop") or []
    sampling = SamplingParams(
        # OpenAI's defaults, where the body leaves a field out or null.
        temperature=body.get("temperature") if body.get("temperature") is not None else 1.0,
        top_p=body.get("top_p") if body.get("top_p") is not None else 1.0,
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 256,
        stop=[stop] if isinstance(stop, str) else list(stop),
        seed=body.get("seed"),
        logprobs=bool(body.get("logprobs")),
    )
    messages = [Message(role=m["role"], content=_text(m.get("content")), tool_calls=m.get("tool_calls") or None,
                        tool_call_id=m.get("tool_call_id")) for m in body["messages"]]
    return ModelRequest(messages=messages, sampling=sampling, tools=body.get("tools") or None,
                        tool_choice=body.get("tool_choice"))


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def completion_json(completion: Completion, tokens: list[str] | None = None) -> dict[str, Any]:
    """A `Completion` as an OpenAI `chat.completion` object, with vLLM's extensions."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text},
        "finish_reason": completion.finish_reason,
        "logprobs": None,
    }
    if completion.tool_calls:
        # As OpenAI answers a tool call: content null when there is no prose beside it.
        choice["message"] = {"role": "assistant", "content": completion.text or None,
                             "tool_calls": completion.tool_calls}
        if completion.finish_reason == "stop":
            choice["finish_reason"] = "tool_calls"
    if completion.token_ids is not None:
        choice["token_ids"] = completion.token_ids
    if completion.logprobs is not None and completion.token_ids is not None:
        tokens = tokens or [str(t) for t in completion.token_ids]
        choice["logprobs"] = {
            "content": [
                {"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(tokens, completion.logprobs)
            ]
        }
    usage = completion.usage
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": completion.model,
        "system_fingerprint": completion.model_version,
        "choices": [choice],
        "prompt_token_ids": completion.prompt_token_ids,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


class WeightRoutes:
    """vLLM's weight-update endpoints over `TransformersModel.load_policy`, so the HTTP client's
    weight sync is tested against a real server (`megaflow.model.weights.update_server`).

    * ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: vLLM's runtime LoRA
      loading; a name loaded before is refused with 400 "already loaded", as vLLM does.
    * ``POST /collective_rpc`` ``{"method": "update_config", "args": [{"model_config":
      {"model": PATH}}]}`` then ``{"method": "reload_weights"}``: vLLM's development-mode
      full reload.

    One set of weights is served at a time (an adapter is merged): the swap waits for the
    batches already queued, and a request never runs on a mix.
    """

    def __init__(self, model):
        self.model = model
        self.loaded: set[str] = set()
        self.pending_path: str | None = None
        self.lock = threading.Lock()

    def routes(self) -> dict:
        return {"/v1/load_lora_adapter": self.load_lora, "/collective_rpc": self.collective_rpc}

    def _swap(self, path: str, kind: str, name: str) -> None:
        match = re.search(r"-v(\d+)$", name)
        version = int(match.group(1)) if match else self.model.policy_version + 1
        done = self.model.load_policy(PolicyRef(policy="served", version=version, path=path, kind=kind))
        if done is not None:
            done.result(timeout=600)

    def load_lora(self, body: dict):
        name, path = str(body["lora_name"]), str(body["lora_path"])
        with self.lock:
            if name in self.loaded:
                return HTTPStatus.BAD_REQUEST, f"The lora adapter '{name}' has already been loaded."
            self._swap(path, "lora", name)
            self.loaded.add(name)
        return HTTPStatus.OK, f"Success: LoRA adapter '{name}' added successfully."

    def collective_rpc(self, body: dict):
        method = body["method"]
        with self.lock:
            if method == "update_config":
                self.pending_path = str(body["args"][0]["model_config"]["model"])
                return HTTPStatus.OK, {"results": [None]}
            if method == "reload_weights":
                if self.pending_path is None:
                    return HTTPStatus.BAD_REQUEST, "reload_weights before update_config named the weights"
                self._swap(self.pending_path, "full", self.pending_path)
                return HTTPStatus.OK, {"results": [None]}
        return HTTPStatus.BAD_REQUEST, f"method {method!r} is not served here"


def make_server(model: TransformersModel, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering for `model`; call `serve_forever()` on it."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(HTTPStatus.OK, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(HTTPStatus.OK, {"object": "list", "data": [{"id": model.name, "object": "model"}]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path in weights_routes:
                self._weights(weights_routes[self.path])
                return
            if self.path != "/v1/chat/completions":
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return
            try:
                request = parse_request(json.loads(self.rfile.read(length)))
                request.request_id = self.headers.get("X-Request-ID", "")
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                self._error(HTTPStatus.BAD_REQUEST, f"invalid request: {exc}")
                return
            try:
                completion = model.generate(request)
            except ContextLengthError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except ModelUnavailableError as exc:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
            except Exception as exc:  # a server answers 500, it does not die
                logger.exception("generation failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
            else:
                tokens = model.token_strings(completion.token_ids) if completion.logprobs is not None else None
                self._send(HTTPStatus.OK, completion_json(completion, tokens))

        def _weights(self, route) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                status, answer = route(body)
            except (ValueError, KeyError, TypeError) as exc:
                status, answer = HTTPStatus.BAD_REQUEST, f"invalid request: {exc}"
            except Exception as exc:  # a checkpoint that fails to load: the server goes on with the old one
                logger.exception("weight update failed")
                status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}"
            if status == HTTPStatus.OK:
                self._send(status, answer if isinstance(answer, dict) else {"message": answer})
            else:
                self._error(status, str(answer))

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": status.phrase, "code": int(status)}})

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    weights_routes = WeightRoutes(model).routes()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible server for a transformers model.")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (shipped) or a local path")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--version", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = TransformersModelConfig(
        model=args.model,
        gguf_file=args.gguf_file,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        context_tokens=args.context_tokens,
        device=args.device,
        version=args.version,
    )
    model = TransformersModel(config)
    model.load()  # before listening: /health answering means ready to generate
    server = make_server(model, args.host, args.port)
    # shutdown() blocks until serve_forever returns, so it cannot run on the serving thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    logger.info("serving %s on http://%s:%d/v1", model.name, args.host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        model.close()


if __name__ == "__main__":
    main()
