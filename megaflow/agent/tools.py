"""The tool-calling scaffold: the model acts through OpenAI-style tool calls, not text.

Three tools, as SWE-agent and Claude's agents offer them:

* ``bash``: run a command in the work directory (a fresh shell each time);
* ``str_replace_based_edit_tool``: the text editor (view, create, str_replace, insert,
  undo_edit), run inside the sandbox by `megaflow.agent.editor_script`, so it works on
  every sandbox backend with a ``python3`` and its effect is journaled like any command;
* ``submit``: done; grade the sandbox.

One call runs per turn, as SWE-agent's function-calling agent runs one; further calls
in the same reply are answered "not run" (every call gets its ``tool`` message, as the
Chat Completions API requires). A reply with no call, a call the backend could not
read, an unknown tool or bad arguments is a format error fed back to the model, and
counts against ``limits.max_format_errors`` like the text scaffolds' errors.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from megaflow.agent.base import Action, Command, FormatError, Submit, truncate_middle
from megaflow.agent.bash import task_statement
from megaflow.model.base import Message
from megaflow.model.toolcalls import arguments, parse_tool_calls
from megaflow.sandbox.base import ExecResult

BASH, EDITOR, SUBMIT = "bash", "str_replace_based_edit_tool", "submit"
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")

TOOLS: list[dict] = [
    {"type": "function", "function": {
        "name": BASH,
        "description": "Run a bash command in the repository's working directory and see its exit code and "
                       "output. Each call starts a new shell: `cd` and variables do not carry over.",
        "parameters": {"type": "object", "properties": {
            "command": {"type": "string", "description": "The command to run."}},
            "required": ["command"]}}},
    {"type": "function", "function": {
        "name": EDITOR,
        "description": "View, create and edit files. `view` shows a file with line numbers (or a directory's "
                       "files); `create` writes a new file; `str_replace` replaces old_str, which must occur "
                       "exactly once, by new_str; `insert` adds new_str after line insert_line (0: at the top); "
                       "`undo_edit` reverts the file's last edit.",
        "parameters": {"type": "object", "properties": {
            "command": {"type": "string", "enum": list(EDITOR_COMMANDS)},
            "path": {"type": "string", "description": "File or directory, absolute or relative to the "
                                                      "working directory."},
            "file_text": {"type": "string", "description": "create: the file's content."},
            "old_str": {"type": "string", "description": "str_replace: the exact text to replace."},
            "new_str": {"type": "string", "description": "str_replace: its replacement; insert: the text."},
            "insert_line": {"type": "integer", "description": "insert: the line after which new_str goes."},
            "view_range": {"type": "array", "items": {"type": "integer"},
                           "description": "view: [start, end] lines, end -1 for the end of the file."}},
            "required": ["command", "path"]}}},
    {"type": "function", "function": {
        "name": SUBMIT,
        "description": "Finish: the changes in the working directory are your answer.",
        "parameters": {"type": "object", "properties": {}}}},
]

SYSTEM_PROMPT = """You are an autonomous software engineer working in a Linux sandbox, in the repository's \
working directory. Act only by calling the tools you are given: `bash` to run commands, \
`str_replace_based_edit_tool` to read and edit files, and `submit` when the task is done. \
Call one tool per reply."""

_HERMES_HINT = ('Call a tool as <tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>, '
                "or through the API's tool calls.")
NOT_RUN = "Not run: this agent runs one tool call per reply. Call it again if it is still needed."
#: A sandbox command is one argument of `bash -c` (every backend), which Linux caps at 128 KiB.
MAX_COMMAND_BYTES = 120_000


@functools.lru_cache(maxsize=1)
def _editor_program() -> str:
    script = Path(__file__).with_name("editor_script.py").read_text()
    return script[:script.rindex('if __name__ == "__main__":')]


def editor_command(args: dict) -> str:
    """The shell command that runs the editor with `args` inside the sandbox.

    The program and its arguments travel in a quoted here-document, so no quoting of
    the file's text can break out of it; the whole command stays one shell argument,
    hence `MAX_COMMAND_BYTES`.
    """
    payload = json.dumps(args)
    return f"python3 - <<'MEGAFLOW_EDITOR'\n{_editor_program()}main(json.loads({payload!r}))\nMEGAFLOW_EDITOR"


class ToolAgent:
    """A scaffold acting through tool calls; `tools` is what the model hop offers the model."""

    tools = TOOLS

    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000):
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.max_observation_chars = max_observation_chars

    def start(self, task) -> list[Message]:
        return [Message(role="system", content=self.system_prompt),
                Message(role="user", content=f"Task:\n{task_statement(task)}")]

    def parse(self, completion: str, tool_calls: list[dict] | None = None) -> Action:
        if not tool_calls:
            errors = parse_tool_calls(completion).errors
            if errors:
                return FormatError("Your tool call could not be read: " + "; ".join(errors) + ". " + _HERMES_HINT)
            return FormatError(f"Reply by calling one of the tools: {BASH}, {EDITOR} or {SUBMIT}. {_HERMES_HINT}")
        return answered(tool_calls, self._action(tool_calls[0]))

    def _action(self, call: dict) -> Action:
        name = call["function"]["name"]
        try:
            args = arguments(call)
        except ValueError as exc:
            return FormatError(f"{exc}. Arguments must be a JSON object.")
        if not isinstance(args, dict):
            return FormatError(f"The arguments of {name!r} must be a JSON object.")
        if name == SUBMIT:
            return Submit("tool")
        if name == BASH:
            cmd = args.get("command")
            if not isinstance(cmd, str) or not cmd.strip():
                return FormatError("bash needs a non-empty string argument `command`.")
        elif name == EDITOR:
            if args.get("command") not in EDITOR_COMMANDS or not isinstance(args.get("path"), str):
                return FormatError(f"{EDITOR} needs `command` (one of {', '.join(EDITOR_COMMANDS)}) and `path`.")
            cmd = editor_command(args)
        else:
            return FormatError(f"Unknown tool {name!r}: the tools are {BASH}, {EDITOR} and {SUBMIT}.")
        size = len(cmd.encode())
        if size > MAX_COMMAND_BYTES:
            return FormatError(f"The {name} call is too large ({size} bytes; one call holds {MAX_COMMAND_BYTES}): "
                               "split it, e.g. create a file with its first part, then insert the rest.")
        return Command(cmd)

    def observe(self, result: ExecResult, command: str = "", tool_calls: list[dict] | None = None) -> list[Message]:
        body = truncate_middle(result.output, self.max_observation_chars)
        if tool_calls and tool_calls[0]["function"]["name"] == EDITOR:
            text = body  # the editor's own message says what happened ("Error: ..." on a mistake)
        else:
            status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
            text = f"[{status}]\n{body}"
        if not tool_calls:  # a turn recorded without its calls (cannot happen from parse): keep the text
            return [Message(role="user", content=text)]
        return tool_answers(tool_calls, [text] + [NOT_RUN] * (len(tool_calls) - 1))

    def finished(self, result: ExecResult) -> Submit | None:
        return None

    def scripted_action(self, task, step: int) -> Action | None:
        return None


def answered(tool_calls: list[dict], action: Action) -> Action:
    """`action` (from the reply's first call) as the episode takes it.

    A format error carries a tool message for every call of the reply, the error for
    the first and "not run" for the rest: chat APIs refuse a conversation where a
    call goes unanswered.
    """
    if isinstance(action, FormatError):
        answers = [action.feedback] + [NOT_RUN] * (len(tool_calls) - 1)
        return FormatError(action.feedback, messages=tuple(tool_answers(tool_calls, answers)))
    return action


def tool_answers(tool_calls: list[dict], texts: list[str]) -> list[Message]:
    """One tool message per call, in order, each answering its call's id."""
    return [Message(role="tool", content=text, tool_call_id=call.get("id") or f"call_{i}")
            for i, (call, text) in enumerate(zip(tool_calls, texts))]
