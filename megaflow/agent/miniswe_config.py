"""mini-swe-agent's own YAML configs: found as it finds them, checked, rendered as it renders them.

A config is the mapping mini-swe-agent reads (``agent:``, ``environment:``, ``model:``
sections). Both of its generations are understood:

* 1.x keeps every template in ``agent:`` (``action_observation_template``,
  ``format_error_template``, ``timeout_template``, ``action_regex``);
* 2.x keeps the observation and format-error templates (and, for its text-based
  models, ``action_regex``) in ``model:``, and reports a timeout through the
  observation's ``exception_info``.

Templates are Jinja2 with ``StrictUndefined``, given the variables mini-swe-agent's
``DefaultAgent.get_template_vars`` gives: the agent section (with its defaults), the
environment section and ``platform.uname()``, the model section, the call counters,
and ``task``; plus MegaFlow's ``max_observation_chars`` (the run spec's, 10000 by default).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jinja2 import StrictUndefined, Template, TemplateError

#: mini-swe-agent 1.x's action regex; 2.x's text-based models default to their own fence.
V1_ACTION_REGEX = r"```bash\s*\n(.*?)\n```"
V2_ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
#: A tool-calling config's command, until the driver hands a reply's tool calls to scaffolds:
#: either fence is read, so the model's text is acted on rather than refused.
EITHER_FENCE_REGEX = r"```(?:bash|mswea_bash_command)\s*\n(.*?)\n```"
#: 2.x's `bash` tool (``models/utils/actions_toolcall.BASH_TOOL``), for configs that act through tool calls.
BASH_TOOL = {"type": "function", "function": {
    "name": "bash", "description": "Execute a bash command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string",
                                                                "description": "The bash command to execute"}},
                   "required": ["command"]}}}
#: ``agents/default.AgentConfig``'s defaults: they are template variables too.
AGENT_DEFAULTS = {"step_limit": 0, "cost_limit": 3.0, "wall_time_limit_seconds": 0,
                  "max_consecutive_format_errors": 3, "output_path": None}
V2_OBSERVATION_TEMPLATE = (
    "{% if output.exception_info %}<exception>{{output.exception_info}}</exception>\n{% endif %}"
    "<returncode>{{output.returncode}}</returncode>\n<output>\n{{output.output}}</output>")
V2_FORMAT_ERROR_TEMPLATE = "Please always provide EXACTLY ONE action in triple backticks, found {{actions|length}} actions."
_SAMPLE_OUTPUT = {"output": "sample output\n", "returncode": 0, "exception_info": ""}


class ConfigError(ValueError):
    """A mini-swe-agent config that cannot be found, read or rendered (one line)."""


def package_config_dir() -> Path | None:
    """The installed mini-swe-agent package's ``config`` folder, or None.

    Found without importing the package: its import prints a banner and makes a
    per-user config folder.
    """
    spec = importlib.util.find_spec("minisweagent")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "config"


def find_config(name: str) -> Path:
    """The file for a config name or path, searched as ``minisweagent.config.get_config_path`` does."""
    spec = Path(name)
    if spec.suffix != ".yaml":
        spec = spec.with_suffix(".yaml")
    candidates = [spec, Path(os.getenv("MSWEA_CONFIG_DIR", ".")) / spec]
    builtin = package_config_dir()
    if builtin is not None:
        candidates += [builtin / spec, builtin / "extra" / spec, builtin / "benchmarks" / spec]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = "" if builtin is not None else " (built-in names need the mini-swe-agent package: pip install mini-swe-agent)"
    raise ConfigError(f"mini-swe-agent config {name!r} not found{hint}; tried {', '.join(map(str, candidates))}")


def load_config(source: str | dict) -> dict:
    """A config as a checked mapping: `source` is a built-in name, a YAML path, or the mapping.

    Raises:
        ConfigError: not found, not YAML, or a template that does not render.
    """
    if isinstance(source, str):
        path = find_config(source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read mini-swe-agent config {path}: {' '.join(str(exc).split())}") from exc
    else:
        data = source
    MiniSweConfig.from_dict(data)  # every template compiles and renders
    return data


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> Template:
    return Template(template, undefined=StrictUndefined)


def render(template: str, **variables) -> str:
    """Render a template as mini-swe-agent does (Jinja2, an undefined name is an error)."""
    return _compiled(template).render(**variables)


def _merge(*dicts: dict) -> dict:
    # As minisweagent.utils.serialize.recursive_merge: later wins, nested mappings merge.
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out


@dataclass(frozen=True)
class MiniSweConfig:
    """What the scaffold takes from a config: its templates, action format and variables."""

    system_template: str
    instance_template: str
    observation_template: str
    format_error_template: str
    #: 1.x only; 2.x reports a timeout through ``output.exception_info``.
    timeout_template: str | None
    action_regex: str
    #: Whether the config's model acts through the `bash` tool rather than text.
    tool_calls: bool
    #: 2.x submits only when the submitting command succeeded.
    submit_needs_success: bool
    variables: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data) -> MiniSweConfig:
        """Read a config mapping.

        Raises:
            ConfigError: a missing section or template, a bad regex, or a template
                that does not compile or render with mini-swe-agent's variables.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a mini-swe-agent config is a mapping, got {type(data).__name__}")
        agent, env, model = (_section(data, name) for name in ("agent", "environment", "model"))
        v1 = "action_observation_template" in agent
        for key in ("system_template", "instance_template"):
            if not isinstance(agent.get(key), str):
                raise ConfigError(f"mini-swe-agent config: agent.{key} must be a string")
        regex = agent.get("action_regex") or model.get("action_regex")
        tool_calls = not (v1 or regex or "textbased" in str(model.get("model_class", "")))
        regex = regex or (V1_ACTION_REGEX if v1 else EITHER_FENCE_REGEX if tool_calls else V2_ACTION_REGEX)
        src = agent if v1 else model
        config = cls(
            system_template=agent["system_template"], instance_template=agent["instance_template"],
            observation_template=_text(src, "action_observation_template" if v1 else "observation_template",
                                       V2_OBSERVATION_TEMPLATE),
            format_error_template=_text(src, "format_error_template", V2_FORMAT_ERROR_TEMPLATE),
            timeout_template=_text(agent, "timeout_template", None) if v1 else None,
            action_regex=regex, tool_calls=tool_calls, submit_needs_success=not v1,
            variables=_merge(AGENT_DEFAULTS, agent, env, platform.uname()._asdict(), model,
                             {"n_model_calls": 0, "model_cost": 0.0, "elapsed_seconds": 0,
                              "max_observation_chars": 10_000}),
        )
        config._check()
        return config

    def _check(self) -> None:
        try:
            if re.compile(self.action_regex, re.DOTALL).groups < 1:
                raise ConfigError(f"mini-swe-agent config: action_regex {self.action_regex!r} has no group")
        except re.error as exc:
            raise ConfigError(f"mini-swe-agent config: bad action_regex {self.action_regex!r}: {exc}") from exc
        samples = [("system_template", {"task": "sample task"}), ("instance_template", {"task": "sample task"}),
                   ("observation_template", {"output": _SAMPLE_OUTPUT}),
                   ("format_error_template", {"actions": [], "error": "Expected exactly 1 action, found 0."}),
                   ("timeout_template", {"action": {"action": "sleep 1"}, "output": ""})]
        for name, values in samples:
            template = getattr(self, name)
            if template is None:
                continue
            try:
                render(template, **self.variables, **values)
            except TemplateError as exc:
                raise ConfigError(f"mini-swe-agent config: {name} does not render: {exc}") from exc


def _section(data: dict, name: str) -> dict:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"mini-swe-agent config: {name} must be a mapping, got {type(value).__name__}")
    return value


def _text(section: dict, key: str, default: str | None) -> str | None:
    value = section.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"mini-swe-agent config: {key} must be a string")
    return value
