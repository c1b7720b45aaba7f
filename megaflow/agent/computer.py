"""The computer-use scaffold: a vision model drives a desktop through tool calls (issue #20).

The model sees the screen as OpenAI-style image parts and acts by calling one tool
per reply — the actions of `megaflow.sandbox.desktop_actions` (screenshot, click,
double_click, drag, type, key, scroll, move, wait, accessibility_tree) and ``done``.
So any vision model behind an OpenAI-compatible server can drive it, and a model
that writes its calls in its text (Hermes ``<tool_call>``) works through the same
parser as the ``tools`` scaffold.

What is stored is references, never bytes: the desktop sandbox keeps each
screenshot in the artifact store and answers an action with its text view and the
screenshot's reference (``artifact:sha256:…``); `observe` turns that into a tool
message (the text view) and a user message whose image part's URL is the reference.
Only when a prompt is built (`prompt`, called by the model hop) are the latest
`keep_screenshots` references turned into ``data:image/png;base64`` URLs; older
ones become a one-line note, so a long episode's prompt stays within a context
budget. Trajectories and exports keep the references and the actions.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megaflow.agent.base import Action, Command, FormatError, Submit
from megaflow.agent.tools import NOT_RUN, answered, tool_answers
from megaflow.errors import InfraError
from megaflow.model.base import Message
from megaflow.model.toolcalls import arguments, parse_tool_calls
from megaflow.sandbox.base import ExecResult
from megaflow.sandbox.desktop_actions import command, tool_schemas
from megaflow.sandbox.desktop_artifacts import PREFIX, ArtifactStore, refs_in

log = logging.getLogger(__name__)

DONE = "done"
TOOLS: list[dict] = [*tool_schemas(), {"type": "function", "function": {
    "name": DONE, "description": "Finish: the task is done (the desktop's state is your answer).",
    "parameters": {"type": "object", "properties": {}}}}]

SYSTEM_PROMPT = """You operate a Linux desktop (1024x768 pixels, origin at the top left) to complete a task. \
Act only by calling the tools you are given, one call per reply: each action returns a screenshot of the \
screen and a list of the open windows (title, position, size); `accessibility_tree` also describes the \
widgets of applications that expose them. Call `done` when the task is complete."""

_HINT = ('Call a tool as <tool_call>{"name": "click", "arguments": {"x": 10, "y": 20}}</tool_call>, '
         "or through the API's tool calls.")
DROPPED = "[screenshot {ref} left out of the prompt: only the latest {keep} are shown]"


class ComputerAgent:
    """The scaffold; `tools` is what the model hop offers the model."""

    tools = TOOLS

    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000,
                 keep_screenshots: int = 3):
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.max_observation_chars = max_observation_chars
        self.keep_screenshots = keep_screenshots

    def start(self, task) -> list[Message]:
        return [Message(role="system", content=self.system_prompt),
                Message(role="user", content=f"Task:\n{task.instruction}")]

    def scripted_action(self, task, step: int) -> Action | None:
        # The first look is free: the model starts from a screenshot, not from a blind guess.
        return Command(command("screenshot", {})) if step == 0 else None

    def parse(self, completion: str, tool_calls: list[dict] | None = None) -> Action:
        if not tool_calls:
            errors = parse_tool_calls(completion).errors
            if errors:
                return FormatError("Your tool call could not be read: " + "; ".join(errors) + ". " + _HINT)
            return FormatError(f"Reply by calling one of the tools ({', '.join(t['function']['name'] for t in TOOLS)})"
                               f". {_HINT}")
        return answered(tool_calls, self._action(tool_calls[0]))

    def _action(self, call: dict) -> Action:
        name = call["function"]["name"]
        try:
            args = arguments(call)
        except ValueError as exc:
            return FormatError(f"{exc}. Arguments must be a JSON object.")
        if name == DONE:
            return Submit("done")
        try:
            return Command(command(name, args if args is not None else {}))
        except ValueError as exc:
            return FormatError(f"{exc}.")

    def observe(self, result: ExecResult, command: str = "", tool_calls: list[dict] | None = None) -> list[Message]:
        text = result.output
        if len(text) > self.max_observation_chars:
            text = text[: self.max_observation_chars] + "\n[... text view truncated ...]"
        messages = tool_answers(tool_calls, [text] + [NOT_RUN] * (len(tool_calls) - 1)) if tool_calls else [
            Message(role="user", content=text)]
        refs = refs_in(result.stdout)
        if refs:  # the image goes in a user message: chat APIs take images from users, not tools
            messages.append(Message(role="user", content=[
                {"type": "text", "text": "The screen now:"},
                {"type": "image_url", "image_url": {"url": refs[-1]}}]))
        return messages

    def finished(self, result: ExecResult) -> Submit | None:
        return None

    def prompt(self, messages: list[Message], data_dir: str | Path) -> list[Message]:
        """What the model is sent: the latest screenshots as data URLs, older ones as notes (`visible`).

        Raises:
            InfraError: a screenshot kept in the prompt is not in this host's artifact
                store (model and env workers must share ``<data_dir>/artifacts``).
        """
        store = ArtifactStore(Path(data_dir) / "artifacts")
        try:
            return visible(messages, self.keep_screenshots, store.data_url)
        except FileNotFoundError as exc:
            raise InfraError(f"{exc.strerror}: model and env workers must share <data_dir>/artifacts") from exc


def visible(messages: list[Message], keep: int, resolve) -> list[Message]:
    """`messages` with the newest `keep` image references resolved by `resolve(ref)`, older ones dropped.

    A dropped image becomes a text part naming its reference, so the model knows a
    screenshot was there; messages without images are returned as they are.
    """
    seen = 0
    out: list[Message] = []
    for m in reversed(messages):
        if isinstance(m.content, str):
            out.append(m)
            continue
        parts = []
        for part in reversed(m.content):
            url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
            if url.startswith(PREFIX):
                seen += 1
                part = ({"type": "image_url", "image_url": {"url": resolve(url)}} if seen <= keep
                        else {"type": "text", "text": DROPPED.format(ref=url, keep=keep)})
            parts.append(part)
        out.append(m.model_copy(update={"content": list(reversed(parts))}))
    return list(reversed(out))

