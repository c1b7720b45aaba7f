"""Tool calls in a model's own text: parse them out, and write them back for a chat template.

An OpenAI-compatible server hands tool calls over already parsed (``message.tool_calls``).
A model run in-process (transformers, vLLM's engine) writes them in its text, and this
module turns that text into the same OpenAI shape
(``{"id", "type": "function", "function": {"name", "arguments": JSON string}}``).

Formats read (the ones vLLM's ``hermes`` and ``llama3_json`` parsers read):

* Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number,
  the last one possibly unclosed (the model stopped at its end-of-turn token);
* a bare JSON object or list of objects with ``name`` and ``arguments`` (or Llama 3's
  ``parameters``), optionally after Llama's ``<|python_tag|>``.

A call that cannot be read makes the whole reply a plain text reply, as vLLM's parsers
do; `ParsedCalls.errors` says why, one line per call, for the agent to feed back.

The other direction, for templates: a chat template that knows tools (Qwen, Llama 3.1,
Hermes) gets the OpenAI-shaped messages and ``tools=``; one that does not (SmolLM2's
plain ChatML) gets the tools in the system prompt and the calls and results written
in the Hermes format, which `parse_tool_calls` reads back.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"

HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ParsedCalls:
    """What a completion's text holds: prose, tool calls (OpenAI shape), and why any call was unreadable."""

    content: str
    calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_tool_calls(text: str) -> ParsedCalls:
    """Read the tool calls out of a model's reply.

    Ids are derived from the text (``call_<hash>_<n>``), so a redelivered call parses
    to the same ids.

    Returns:
        ParsedCalls: with no errors, ``content`` is the text outside the calls; with
        errors, ``calls`` is empty and ``content`` the whole text.
    """
    bodies = [m.group(1) for m in _HERMES.finditer(text)]
    if bodies:
        content = text[:text.index("<tool_call>")].strip()
        return _calls(text, bodies, content)
    stripped = text.strip()
    if stripped.startswith(_PYTHON_TAG):
        stripped = stripped[len(_PYTHON_TAG):].strip()
    if stripped[:1] in ("{", "["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            return ParsedCalls(content=text)  # prose that happens to start with a brace
        items = data if isinstance(data, list) else [data]
        if items and all(isinstance(i, dict) and "name" in i and ("arguments" in i or "parameters" in i)
                         for i in items):
            return _calls(text, [json.dumps(i) for i in items], "")
    return ParsedCalls(content=text)


def _calls(text: str, bodies: list[str], content: str) -> ParsedCalls:
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    calls, errors = [], []
    for n, body in enumerate(bodies):
        call, error = _one(body)
        if error:
            errors.append(f"tool call {n + 1}: {error}")
        else:
            calls.append({"id": f"call_{digest}_{n}", "type": "function", "function": call})
    if errors:
        return ParsedCalls(content=text, errors=errors)
    return ParsedCalls(content=content, calls=calls)


def _one(body: str) -> tuple[dict, str]:
    """One call's ``{"name", "arguments": JSON string}``, or an error line."""
    try:
        data = json.loads(body.strip())
    except json.JSONDecodeError as exc:
        return {}, f"not valid JSON ({exc.msg} at char {exc.pos}): {body.strip()[:120]!r}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return {}, 'must be a JSON object {"name": ..., "arguments": {...}}'
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return {}, f"arguments of {data['name']!r} are not a JSON object"
    if not isinstance(args, dict):
        return {}, f"arguments of {data['name']!r} must be a JSON object"
    return {"name": data["name"], "arguments": json.dumps(args)}, ""


def arguments(call: dict) -> Any:
    """A call's arguments decoded (a dict for calls from `parse_tool_calls`).

    Raises:
        ValueError: the arguments string is not JSON (a server passed the model's text on as is).
    """
    raw = call["function"].get("arguments") or "{}"
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"arguments of {call['function'].get('name')!r} are not valid JSON: {exc.msg}") from exc


def hermes_text(content: str, calls: list[dict]) -> str:
    """A reply with tool calls written as a Hermes-format model writes it (what `parse_tool_calls` reads)."""
    parts = [content] if content else []
    for call in calls:
        try:
            args = arguments(call)
        except ValueError:
            args = call["function"].get("arguments")
        parts.append("<tool_call>\n" + json.dumps({"name": call["function"]["name"], "arguments": args})
                     + "\n</tool_call>")
    return "\n".join(parts)


def template_knows_tools(template: Any) -> bool:
    """Whether a chat template renders ``tools=`` and assistant ``tool_calls`` itself."""
    if isinstance(template, dict):  # several named templates: the default, or any that knows tools
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def chat_for_template(messages: list, tools: list[dict] | None, native: bool) -> list[dict]:
    """Messages (`Message`s or dicts) as a chat template takes them.

    Native templates get OpenAI-shaped dicts (tool-call arguments decoded, as
    transformers' templates expect); for the others the tools go into the system
    prompt and calls and results are written in the Hermes format.
    """
    chat = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m) for m in messages]
    if native:
        for m in chat:
            if m.get("tool_calls"):
                m["tool_calls"] = [_decoded(c) for c in m["tool_calls"]]
        return chat
    out = []
    for m in chat:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": hermes_text(m.get("content") or "", m["tool_calls"])})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _decoded(call: dict) -> dict:
    try:
        args = arguments(call)
    except ValueError:
        return call
    return {**call, "function": {**call["function"], "arguments": args}}


def render_prompt(tokenizer: Any, messages: list, tools: list[dict] | None = None, *,
                  add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` (and `tools`) through a tokenizer's chat template.

    A tokenizer with no template (a base model) gets a plain transcript, the usual fallback.
    """
    template = getattr(tokenizer, "chat_template", None)
    native = template_knows_tools(template)
    chat = chat_for_template(messages, tools, native)
    if not template:
        return "".join(f"{m['role']}: {m['content']}\n" for m in chat) + ("assistant:" if add_generation_prompt
                                                                           else "")
    kwargs = {"tools": tools} if native and tools else {}
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
