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
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


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

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": status.phrase, "code": int(status)}})

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

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
