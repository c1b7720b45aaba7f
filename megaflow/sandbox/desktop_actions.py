"""Computer-use actions: one table, read by the sandbox (argv), the agent (tool schemas) and task files.

An action is a name and its arguments, as a model's tool call gives them
(``{"name": "click", "arguments": {"x": 10, "y": 20}}``) or a task's oracle lists
them (``{action: click, x: 10, y: 20}``). In the sandbox it becomes one command,
``megaflow-desktop click 10 20`` (the helper in the desktop image): a plain shell
command, so the env hops, the exec journal and ``megaflow env validate`` run it as
any other, and the desktop sandbox recognises it to keep the screenshot it returns.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

#: The helper every action runs through (installed in the desktop image).
HELPER = "megaflow-desktop"
#: Longest text one `type` action may enter (xdotool types ~100 keys/s).
MAX_TEXT = 2000
MAX_WAIT_S = 30.0
DIRECTIONS = ("up", "down", "left", "right")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "int" | "str" | "number" | "keys" | "direction"
    description: str
    required: bool = True


def _xy(what: str = "") -> tuple[Param, Param]:
    return (Param("x", "int", f"Screen x coordinate in pixels{what}."),
            Param("y", "int", f"Screen y coordinate in pixels{what}."))


#: name -> (description, parameters in argv order).
ACTIONS: dict[str, tuple[str, tuple[Param, ...]]] = {
    "screenshot": ("Take a screenshot of the screen (no input).", ()),
    "click": ("Move the mouse to (x, y) and click a button (1 left, 2 middle, 3 right).",
              (*_xy(), Param("button", "int", "Mouse button, default 1 (left).", required=False))),
    "double_click": ("Double-click the left button at (x, y).", _xy()),
    "drag": ("Press the left button at (x, y), move to (to_x, to_y) and release it.",
             (*_xy(" where the drag starts"), Param("to_x", "int", "Where the drag ends (x)."),
              Param("to_y", "int", "Where the drag ends (y)."))),
    "type": ("Type text with the keyboard into the focused window (newlines press Return).",
             (Param("text", "str", f"The text, at most {MAX_TEXT} characters."),)),
    "key": ("Press a key combination, e.g. 'ctrl+s', 'Return', 'alt+F4' (X keysym names joined by '+').",
            (Param("keys", "keys", "The combination; several, separated by spaces, are pressed in turn."),)),
    "scroll": ("Scroll the mouse wheel at (x, y).",
               (*_xy(), Param("direction", "direction", "up, down, left or right."),
                Param("amount", "int", "Wheel clicks, default 3.", required=False))),
    "move": ("Move the mouse to (x, y) without clicking.", _xy()),
    "wait": ("Wait, then take a screenshot (for an application that is still starting).",
             (Param("seconds", "number", f"How long, at most {MAX_WAIT_S:g} s."),)),
    "accessibility_tree": ("Describe the windows' widgets (AT-SPI tree, where the application exposes one).",
                           ()),
}


def to_argv(name: str, arguments: dict) -> list[str]:
    """The helper's argv for one action (without the helper's name).

    Raises:
        ValueError: unknown action, a missing or extra argument, or a value of the
            wrong kind; the message is one line, fit to show the model.
    """
    if name not in ACTIONS:
        raise ValueError(f"unknown action {name!r}; known: {', '.join(ACTIONS)}")
    if not isinstance(arguments, dict):
        raise ValueError(f"{name}: arguments must be an object, not {type(arguments).__name__}")  # noqa: TRY004 - one error type for pydantic and format errors
    params = ACTIONS[name][1]
    extra = sorted(set(arguments) - {p.name for p in params})
    if extra:
        raise ValueError(f"{name}: unexpected argument(s) {', '.join(extra)}")
    argv = [name]
    for p in params:
        if p.name not in arguments or arguments[p.name] is None:
            if p.required:
                raise ValueError(f"{name}: missing argument {p.name!r}")
            continue
        argv.append(_value(name, p, arguments[p.name]))
    return argv


def _value(action: str, p: Param, value) -> str:
    where = f"{action}: {p.name}"
    if p.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be an integer, not {value!r}")
        if value != int(value) or not 0 <= value <= 100_000:
            raise ValueError(f"{where} must be a whole number from 0 to 100000, not {value!r}")
        return str(int(value))
    if p.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT_S:
            raise ValueError(f"{where} must be a number of seconds from 0 to {MAX_WAIT_S:g}, not {value!r}")
        return f"{value:g}"
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, not {type(value).__name__}")  # noqa: TRY004 - as above
    if p.kind == "direction":
        if value not in DIRECTIONS:
            raise ValueError(f"{where} must be one of {', '.join(DIRECTIONS)}, not {value!r}")
        return value
    if p.kind == "keys":
        combos = value.split()
        if not combos or any(not c.replace("+", "").replace("_", "").isalnum() for c in combos):
            raise ValueError(f"{where} must be key names joined by '+' (e.g. ctrl+s), not {value!r}")
        return value
    if not value or len(value) > MAX_TEXT or "\x00" in value:
        raise ValueError(f"{where} must be 1 to {MAX_TEXT} characters without NUL")
    return value


def command(name: str, arguments: dict) -> str:
    """The shell command performing the action in a desktop sandbox.

    Raises:
        ValueError: see `to_argv`.
    """
    argv = to_argv(name, arguments)
    if name == "key":  # several combinations: separate arguments to the helper
        argv = [argv[0], *argv[1].split()]
    return shlex.join([HELPER, *argv])


def parse_command(cmd: str) -> list[str] | None:
    """The helper's argv of an action command (`command`'s output), else None (a plain command)."""
    if not cmd.startswith(HELPER + " "):
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if len(words) < 2 or words[0] != HELPER or words[1] not in ACTIONS:
        return None
    return words[1:]


def tool_schemas() -> list[dict]:
    """The actions as OpenAI-style function tools (``tools=`` of a chat completion request)."""
    types = {"int": {"type": "integer"}, "number": {"type": "number"}, "str": {"type": "string"},
             "keys": {"type": "string"}, "direction": {"type": "string", "enum": list(DIRECTIONS)}}
    tools = []
    for name, (description, params) in ACTIONS.items():
        properties = {p.name: {**types[p.kind], "description": p.description} for p in params}
        tools.append({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties,
                           "required": [p.name for p in params if p.required]}}})
    return tools
