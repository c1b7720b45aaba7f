"""The Agent interface: task + history -> prompt; completion -> action or finish."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult


@dataclass(frozen=True)
class Command:
    """Run this shell command in the sandbox."""

    cmd: str


@dataclass(frozen=True)
class Submit:
    """The agent is done; evaluate the sandbox."""

    note: str = ""


@dataclass(frozen=True)
class FormatError:
    """The completion could not be turned into an action; `feedback` goes back to the model."""

    feedback: str
    #: The messages carrying it, where one user message would not do (a tool-calling
    #: scaffold answers each call with a tool message); empty: a user message.
    messages: tuple[Message, ...] = ()


Action = Union[Command, Submit, FormatError]


class Agent(Protocol):
    """A scaffold. Pure functions of their inputs: any agent worker can run any step."""

    def start(self, task) -> list[Message]:
        """Messages that open the conversation (system prompt, task statement)."""

    def parse(self, completion: str) -> Action:
        """Turn the model's reply into an action."""

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        """Messages reporting the result of `command` to the model."""

    def finished(self, result: ExecResult) -> Submit | None:
        """Whether a command's result ends the episode (mini-swe-agent submits through output)."""

    def scripted_action(self, task, step: int) -> Action | None:
        """An action chosen without the model (oracle scaffolds), or None to ask the model."""


def truncate_middle(text: str, limit: int) -> str:
    """Keep the head and the tail of `text`, with a visible marker between them."""
    if len(text) <= limit:
        return text
    half = limit // 2
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted} characters omitted ...]\n{text[-half:]}"


def transcript(steps) -> list[dict]:
    """The conversation of an episode, rebuilt from its step rows in index order.

    Each step contributes the messages added before its model call, then the
    model's completion as an assistant message. This is what the model saw, plus
    its last answer (``conversation()`` in the model hop stops before that).

    Tool calling keeps the OpenAI shape: an assistant message carries the turn's
    ``tool_calls``, a ``tool`` message its ``tool_call_id``; other messages have
    only role and content.

    Args:
        steps: Objects with ``messages_in`` (list of message dicts), ``completion``
            (str or None) and optionally ``tool_calls``, e.g. `Step` rows.
    """
    messages: list[dict] = []
    for step in steps:
        for m in step.messages_in or []:
            message = {"role": m["role"], "content": m["content"]}
            if m.get("tool_call_id"):
                message["tool_call_id"] = m["tool_call_id"]
            messages.append(message)
        if step.completion is not None:
            message = {"role": "assistant", "content": step.completion}
            if getattr(step, "tool_calls", None):
                message["tool_calls"] = step.tool_calls
            messages.append(message)
    return messages
