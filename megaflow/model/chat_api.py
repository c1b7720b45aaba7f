"""The chat APIs a CLI agent speaks to the model proxy: OpenAI Chat Completions and Anthropic Messages.

Pure translation, both ways: a request body into MegaFlow `Message` s, and a recorded
turn (completion, tool calls, usage) into the response body the client expects. The
proxy (`megaflow.hops.cli_proxy`) does the rest. Sampling settings in a request are
not used: the run's spec decides them, as for every scaffold (an RL batch must not
mix sampling settings the trainer does not know of).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from megaflow.model.base import Message


class BadRequest(ValueError):
    """A request body the proxy cannot use; its text goes back to the client (HTTP 400)."""


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise BadRequest(f"{where}: only text content is supported, got a {type(part).__name__} "
                                 f"{(part.get('type') if isinstance(part, dict) else part)!r}")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string or a list of parts")


def openai_messages(body: dict) -> list[Message]:
    """The messages of a Chat Completions request body.

    Raises:
        BadRequest: no messages, or one MegaFlow cannot record (not text, unknown role).
    """
    raw = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(raw, list) or not raw:
        raise BadRequest("the request has no 'messages' list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] is not an object")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}]: unknown role {m.get('role')!r}")
        try:
            out.append(Message(role=role, content=_text(m.get("content"), f"messages[{i}]"),
                               tool_calls=m.get("tool_calls") or None, tool_call_id=m.get("tool_call_id")))
        except ValueError as exc:
            raise BadRequest(f"messages[{i}]: {exc}") from exc
    return out


def anthropic_messages(body: dict) -> list[Message]:
    """The messages of an Anthropic Messages request body (system, text, tool_use, tool_result).

    Raises:
        BadRequest: as `openai_messages`.
    """
    raw = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(raw, list) or not raw:
        raise BadRequest("the request has no 'messages' list")
    out = []
    system = body.get("system")
    if system:
        out.append(Message(role="system", content=_text(system, "system")))
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}]: role must be user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append(Message(role=role, content=content))
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}]: content must be a string or a list of blocks")
        text, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(str(block.get("text", "")))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                    "name": str(block.get("name", "")), "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                out.append(Message(role="tool", tool_call_id=str(block.get("tool_use_id", "")),
                                   content=_text(block.get("content"), f"messages[{i}].content[{j}]")))
            else:
                raise BadRequest(f"messages[{i}].content[{j}]: block type {kind!r} is not supported")
        if text or calls:
            out.append(Message(role=role, content="".join(text), tool_calls=calls or None))
    return out


def openai_tools(body: dict, anthropic: bool = False) -> list[dict] | None:
    """The request's tools in the OpenAI shape (Anthropic's ``input_schema`` becomes ``parameters``)."""
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("'tools' must be a list of objects")
    if not anthropic:
        return tools
    return [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                              "parameters": t.get("input_schema") or {}}} for t in tools]


def openai_tool_choice(body: dict, anthropic: bool = False) -> str | dict | None:
    """The request's tool choice in the OpenAI shape (Anthropic's ``auto`` / ``any`` / ``tool`` / ``none``).

    Raises:
        BadRequest: an Anthropic tool choice of an unknown type.
    """
    choice = body.get("tool_choice")
    if choice is None or not anthropic:
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    raise BadRequest(f"tool_choice: type {kind!r} is not supported (auto, any, tool, none)")


def openai_response(turn: dict, model: str) -> dict:
    """A Chat Completions response for a recorded turn (keys: completion, tool_calls, finish_reason, usage)."""
    message: dict[str, Any] = {"role": "assistant", "content": turn.get("completion") or ""}
    if turn.get("tool_calls"):
        message["tool_calls"] = turn["tool_calls"]
    prompt, completion = turn.get("prompt_tokens") or 0, turn.get("completion_tokens") or 0
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": "tool_calls" if turn.get("tool_calls")
                                         else (turn.get("finish_reason") or "stop")}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def openai_stream(response: dict) -> bytes:
    """The same response as a server-sent event stream of one chunk (for clients that ask to stream)."""
    choice = response["choices"][0]
    chunk = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"],
             "model": response["model"], "choices": [{"index": 0, "delta": choice["message"],
                                                      "finish_reason": choice["finish_reason"]}],
             "usage": response["usage"]}
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


def anthropic_response(turn: dict, model: str) -> dict:
    """An Anthropic Messages response for a recorded turn."""
    content: list[dict] = []
    if turn.get("completion"):
        content.append({"type": "text", "text": turn["completion"]})
    for call in turn.get("tool_calls") or []:
        try:
            arguments = json.loads(call["function"]["arguments"] or "{}")
        except ValueError:
            arguments = {"_raw": call["function"]["arguments"]}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:12]}",
                        "name": call["function"]["name"], "input": arguments})
    stop = "tool_use" if turn.get("tool_calls") else {"length": "max_tokens"}.get(turn.get("finish_reason"),
                                                                                 "end_turn")
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": turn.get("prompt_tokens") or 0,
                      "output_tokens": turn.get("completion_tokens") or 0}}


def error_body(message: str, anthropic: bool = False, kind: str = "invalid_request_error") -> dict:
    """An error response body in the client's API shape."""
    if anthropic:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "code": None}}
