"""Run specs: what a user submits. Validated in full before anything is queued."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from megaflow.errors import SpecError
from megaflow.model.config import ModelConfig, ScriptedModelConfig
from megaflow.sandbox.base import SandboxConfig

#: Upper bound on episodes in one run; beyond it a spec is refused as absurd.
MAX_EPISODES_PER_RUN = 1_000_000
#: Upper bound on a whole spec, serialized (inline files included): runs are rows, not blobs.
MAX_SPEC_BYTES = 256 << 20
#: What a task's `instance_id` may look like: it names files in exports, so no path tricks.
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:@+=,~-]*(/[A-Za-z0-9_][A-Za-z0-9._:@+=,~-]*)*$"


class _Strict(BaseModel):
    # strict: a mistyped field ("3" for an int, "yes" for a bool) is refused, never coerced.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


def _relative_file(path: str) -> str:
    """A task file's path: relative to the work directory, never climbing out of it."""
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "\x00" in path:
        raise ValueError(f"file path {path!r} must be relative to the work directory, without '..'")
    return path


def _relative_files(files: dict[str, str]) -> dict[str, str]:
    for path in files:
        _relative_file(path)
    return files


#: A task's files: paths relative to the work directory (checked by `_relative_file`).
TaskFiles = Annotated[dict[str, str], AfterValidator(_relative_files)]


class TerminalTask(_Strict):
    """A Terminal-bench style task: an instruction, and a check script that decides the reward."""

    kind: Literal["terminal"] = "terminal"
    instance_id: str = Field(min_length=1, max_length=200, pattern=INSTANCE_ID_PATTERN)
    instruction: str = Field(min_length=1, description="What the agent is asked to do.")
    setup: list[str] = Field(default_factory=list, description="Commands run in the sandbox before the agent starts.")
    files: TaskFiles = Field(default_factory=dict, description="Files placed in the work dir before setup.")
    check: str = Field(min_length=1, description="Shell script; reward 1 iff it exits 0.")
    solution: list[str] = Field(default_factory=list, description="Gold commands (used by the oracle agent).")


class Environment(_Strict):
    """How a task's environment is made: built once per distinct environment, cached by content.

    Docker: an image ``megaflow/env-<hash>`` FROM `base_image` with the apt packages,
    a virtualenv at ``/opt/megaflow-env`` holding the pip requirements, and the
    install commands run; the task's repository image is built on it. Local
    (bubblewrap): the same virtualenv built once on the host and bound read-only.
    Either way the virtualenv comes first on PATH, so ``python`` resolves.
    """

    base_image: str | None = Field(default=None, description="Docker base image (default megaflow/python).")
    python: str | None = Field(default=None, pattern=r"^3\.[0-9]{1,2}$",
                               description="Python version of the virtualenv (python3.X must be in the base).")
    apt: list[str] = Field(default_factory=list, description="Debian packages (docker; checked present on local).")
    pip: list[str] = Field(default_factory=list, description="pip requirements installed into the virtualenv.")
    install: list[str] = Field(default_factory=list, description="Commands run at build time, virtualenv active.")


class SWETask(_Strict):
    """A repository task in the SWE-bench instance shape."""

    kind: Literal["swe"] = "swe"
    instance_id: str = Field(min_length=1, max_length=200, pattern=INSTANCE_ID_PATTERN)
    problem_statement: str = Field(min_length=1)
    repo: str = Field(default="", description="Repo source: local dir, git URL or pypi:NAME==VER (built into the image).")
    image: str | None = Field(default=None, description="Docker image holding the repo at /work.")
    environment: Environment | None = Field(default=None, description="How the task's environment is built.")
    files: TaskFiles = Field(default_factory=dict, description="Repo files written into the work dir (small repos).")
    setup: list[str] = Field(default_factory=list)
    test_command: str = Field(
        default="python3 .megaflow_runtests.py",
        description="Command that runs tests; test ids appended. The default, `python3 .megaflow_runtests.py`, is "
        "`python3 -m pytest -rA -p no:cacheprovider` where pytest imports, else a pytest-free fallback for plain "
        "node ids (megaflow.envs.runtests).",
    )
    FAIL_TO_PASS: list[str] = Field(default_factory=list)
    PASS_TO_PASS: list[str] = Field(default_factory=list)
    test_args: list[str] | None = Field(
        default=None, description="Arguments appended to test_command instead of the test ids ([]: none), "
        "e.g. for a command taken from the SWE-bench harness's eval script.")
    workdir: str | None = Field(default=None, description="Work directory in the task's image (SWE-bench: /testbed).")
    swebench: dict[str, str] = Field(
        default_factory=dict, description="What a published SWE-bench record said: repo, version, base_commit, "
        "environment_setup_commit, log_parser (the swebench parser grading uses)...")
    patch: str = Field(default="", description="Gold patch.")
    protected_files: list[str] = Field(
        default_factory=list,
        description="More files restored to their pristine state before grading (tests' files, conftest.py "
        "files and test configuration always are).")
    test_patch: str = Field(default="", description="Patch adding the tests, applied before evaluation.")

    @field_validator("protected_files")
    @classmethod
    def _protected_relative(cls, value: list[str]) -> list[str]:
        for path in value:
            _relative_file(path)
        return value

    @field_validator("repo")
    @classmethod
    def _repo_source(cls, value: str) -> str:
        if value:
            from megaflow.envs.repos import RepoSource

            RepoSource.parse(value)  # ValueError: not a source
        return value


class ComputerTask(_Strict):
    """A computer-use task (issue #20): a desktop sandbox, GUI actions, a check script run inside it afterwards.

    Runs on the ``desktop`` sandbox only (`megaflow.sandbox.desktop`); `solution`
    lists the oracle's actions in the action table's shape
    (`megaflow.sandbox.desktop_actions`): ``{action: type, text: "hello"}``.
    """

    kind: Literal["computer"] = "computer"
    instance_id: str = Field(min_length=1, max_length=200, pattern=INSTANCE_ID_PATTERN)
    instruction: str = Field(min_length=1, description="What the agent is asked to do on the desktop.")
    setup: list[str] = Field(default_factory=list, description="Commands run in the desktop before the agent "
                             "starts; `megaflow-desktop launch CMD` opens an application and waits for its window.")
    files: TaskFiles = Field(default_factory=dict, description="Files placed in the home (work) directory first.")
    check: str = Field(min_length=1, description="Shell script run inside the desktop after the episode (it sees "
                       "the display: wmctrl, xdotool); reward 1 iff it exits 0.")
    solution: list[dict] = Field(default_factory=list, description="Oracle actions, e.g. {action: click, x: 10, y: 20}.")

    @field_validator("solution")
    @classmethod
    def _actions(cls, value: list[dict]) -> list[dict]:
        from megaflow.sandbox.desktop_actions import to_argv

        for i, action in enumerate(value):
            args = {k: v for k, v in action.items() if k != "action"}
            try:
                to_argv(action.get("action", ""), args)
            except ValueError as exc:
                raise ValueError(f"solution[{i}]: {exc}") from None
        return value


def _task_kind(value) -> str:
    # `kind` may be left out of a task: terminal is the default family.
    if isinstance(value, dict):
        return value.get("kind", "terminal")
    return getattr(value, "kind", "terminal")


TaskSpec = Annotated[
    Annotated[TerminalTask, Tag("terminal")] | Annotated[SWETask, Tag("swe")]
    | Annotated[ComputerTask, Tag("computer")],
    Discriminator(_task_kind),
]


class AgentConfig(_Strict):
    """Which scaffold drives the episode."""

    type: Literal["bash", "oracle", "miniswe", "cli", "tools", "computer"] = Field(
        default="bash", description="Scaffold; `tools` acts through native tool calls (megaflow.agent.tools).")
    keep_screenshots: int = Field(default=3, ge=0, le=1000, description="computer: screenshots shown to the "
                                  "model, the latest; older ones become a text note (context budget).")
    system_prompt: str | None = Field(default=None, description="Override of the scaffold's system prompt.")
    max_observation_chars: int = Field(default=10_000, ge=200, le=1_000_000, description="Head+tail kept.")
    command: str | None = Field(
        default=None, min_length=1, max_length=100_000,
        description="type cli: the agent program's shell command, run in the sandbox's work directory for the "
        "whole episode. It reaches the run's model at $OPENAI_BASE_URL (or $ANTHROPIC_BASE_URL) with the key in "
        "$OPENAI_API_KEY; the task's instruction is in $MEGAFLOW_TASK and the file $MEGAFLOW_TASK_FILE.")
    port: int = Field(default=4000, ge=1024, le=65_535,
                      description="type cli: the loopback port in the sandbox where the model endpoint listens.")
    config: str | dict | None = Field(
        default=None,
        description="miniswe: a mini-swe-agent config (its templates, action format): a built-in name such as "
        "`swebench` (needs the mini-swe-agent package), a path to a YAML file in its format, or the mapping. "
        "Read and checked when the spec is validated and kept in the run, so workers need neither.",
    )

    @model_validator(mode="after")
    def _cli_command(self) -> AgentConfig:
        if (self.type == "cli") != (self.command is not None):
            raise ValueError("agent.command is required by type cli and only allowed there")
        return self

    @field_validator("config")
    @classmethod
    def _miniswe_config(cls, value):
        if value is None:
            return value
        from megaflow.agent.miniswe_config import load_config

        return load_config(value)  # ConfigError (a ValueError): one line

    @model_validator(mode="after")
    def _config_is_miniswe(self) -> AgentConfig:
        if self.config is not None and self.type != "miniswe":
            raise ValueError(f"config is a mini-swe-agent config: only for type miniswe, not {self.type}")
        return self


class Limits(_Strict):
    """Deadlines and caps for every phase of an episode."""

    max_steps: int = Field(default=30, ge=1, le=10_000)
    max_tokens: int = Field(default=200_000, ge=1, le=1_000_000_000, description="Total tokens per episode.")
    max_format_errors: int = Field(default=3, ge=0, le=100)
    episode_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    provision_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    model_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    exec_timeout_s: float = Field(default=120.0, gt=0, le=86400)
    eval_timeout_s: float = Field(default=900.0, gt=0, le=86400)
    model_retries: int = Field(
        default=5, ge=0, le=20,  # Celery's own cap on a hop's retries is 20
        description="A model call failing for infra reasons (server down, 5xx) is retried this often, "
        "with backoff, before the episode ends infra_failed. Rate-limit waits do not count.",
    )
    model_retry_backoff_s: float = Field(
        default=1.0, gt=0, le=3600, description="First model-call retry delay; doubles per retry (capped at 60s)."
    )
    no_submit_penalty: float = Field(default=-0.5, description="Reward when the agent never submits (paper: -0.5).")


class ModelLimits(_Strict):
    """Tier-1 concurrency control: limits on a run's (or user's) Model Service calls.

    Enforced across every model worker at once through shared state (the state
    database, or Redis when the result backend is Redis; see `megaflow.ratelimit`).
    A call over a limit never holds a worker thread: its hop is re-queued to run
    when the limit allows, and those waits do not count as retries.
    """

    scope: Literal["run", "user"] = Field(
        default="run", description="Whose calls share the limits: this run's, or every run of `RunSpec.user`."
    )
    requests_per_s: float | None = Field(default=None, gt=0, le=1e6, description="Calls started per second.")
    tokens_per_s: float | None = Field(
        default=None, gt=0, le=1e9,
        description="Prompt + completion tokens per second. A call reserves an estimate (prompt chars / 4 + "
        "max_tokens) and is charged its real usage when it ends.",
    )
    max_in_flight: int | None = Field(default=None, ge=1, le=1_000_000, description="Calls running at once.")
    burst_s: float = Field(
        default=1.0, gt=0, le=3600,
        description="Bucket size in seconds of each rate: how far calls may run ahead after an idle spell.",
    )
    lease_s: float = Field(
        default=300.0, gt=0, le=86400,
        description="An in-flight slot held longer is presumed lost (its worker died) and freed; "
        "keep it above the longest model call.",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> ModelLimits:
        if self.requests_per_s is None and self.tokens_per_s is None and self.max_in_flight is None:
            raise ValueError("set at least one of requests_per_s, tokens_per_s, max_in_flight")
        return self


class Simulation(_Strict):
    """Service latencies simulated on the broker, for benchmarks of the orchestration itself.

    A model or exec hop's message waits this long in a broker-side delay queue (a
    RabbitMQ TTL queue dead-lettering into the hop's own queue) before a worker takes
    it, as if the call were in flight at a service that answers asynchronously: no
    worker thread is held while it waits. Combine with the scripted model and the
    memory sandbox to measure what MegaFlow adds, not what the services cost.
    """

    model_latency_s: float = Field(default=0.0, ge=0.0, le=3600.0, description="Delay before each model call.")
    exec_latency_s: float = Field(default=0.0, ge=0.0, le=3600.0, description="Delay before each command.")


class RLSettings(_Strict):
    """How a run feeds an RL trainer: which policy samples it, and how stale that policy may be.

    A *batch* is `groups_per_batch` consecutive rollout groups (by task order). Batch b
    of a run that started at policy version v0 is admitted only once version
    v0 + b - k is published, k = 0 in `sync` mode (the run pauses at each boundary
    until the trainer publishes) and `max_staleness` in `async` mode. Each turn is
    sampled with the newest published weights the model worker has switched to, and
    never with weights more than k versions behind the newest (docs/rl.md, "Staleness").
    """

    policy: str = Field(default="default", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$",
                        description="Policy name: versions published under it (`megaflow policy publish`) are "
                        "what this run's model workers switch to.")
    mode: Literal["sync", "async"] = Field(default="async", description="sync: generation for version v+1 starts "
                                           "only once it is published; async: up to max_staleness versions ahead.")
    max_staleness: int | None = Field(default=None, ge=0, le=1000, description="async: most versions a turn's "
                                      "policy may lag the newest; None: unbounded (admission never waits).")
    groups_per_batch: int = Field(default=1, ge=1, le=1_000_000, description="Groups per trainer batch: the "
                                  "boundary at which a sync run pauses.")

    @model_validator(mode="after")
    def _staleness_in_async_only(self) -> RLSettings:
        if self.mode == "sync" and self.max_staleness is not None:
            raise ValueError("rl.max_staleness applies to mode async only (sync means 0)")
        return self

    @property
    def bound(self) -> int | None:
        """Versions a batch may run ahead of the trainer: 0 in sync mode, `max_staleness` in async."""
        return 0 if self.mode == "sync" else self.max_staleness


class RunSpec(_Strict):
    """A run: every task instance × `rollouts` samples."""

    name: str = Field(default="run", min_length=1, max_length=200)
    user: str = Field(default="default", min_length=1, max_length=100)
    project: str = Field(default="default", min_length=1, max_length=100)
    tasks: list[TaskSpec] = Field(min_length=1, description="Task instances (inline, or loaded from tasks_file).")
    rollouts: int = Field(default=1, ge=1, le=4096, description="Samples per task: one chord group each.")
    model: ModelConfig = Field(default_factory=ScriptedModelConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    limits: Limits = Field(default_factory=Limits)
    model_limits: ModelLimits | None = Field(default=None, description="Tier-1 limits on model calls; None: none.")
    simulate: Simulation | None = Field(default=None, description="Simulated service latencies (benchmarks).")
    rl: RLSettings | None = Field(default=None, description="RL: the policy this run samples (its model workers "
                                  "switch to each published version) and its staleness bound; None: fixed weights.")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets_or_nul(cls, data):
        """Refuse NUL characters anywhere, and credentials anywhere outside the tasks.

        A spec is stored in the state database and read by every worker: a secret in it
        would end up in backups, exports and logs. Keys come from the environment
        (``model.api_key_env``); sandboxes get none at all.
        """
        if not isinstance(data, dict):
            return data
        from megaflow.redact import find_nul, find_secrets

        nul = find_nul(data)
        if nul:
            raise ValueError(f"{nul}: NUL characters are not allowed")
        secrets = find_secrets({k: v for k, v in data.items() if k != "tasks"})
        if secrets:
            raise ValueError(
                f"{', '.join(secrets[:5])}: looks like a credential. Specs are stored and shown: put secrets "
                "in an environment variable of the model worker and name it (model.api_key_env); "
                "sandboxes get no credentials")
        return data

    @model_validator(mode="after")
    def _sizes(self) -> RunSpec:
        n = len(self.tasks) * self.rollouts
        if n > MAX_EPISODES_PER_RUN:
            raise ValueError(f"{n} episodes in one run is over the limit of {MAX_EPISODES_PER_RUN}")
        counts = Counter(t.instance_id for t in self.tasks)
        dupes = sorted(i for i, c in counts.items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate instance_id: {', '.join(dupes[:5])}")
        if self.sandbox.type != "desktop" and any(t.kind == "computer" for t in self.tasks):
            raise ValueError(f"computer tasks run on the desktop sandbox: set sandbox.type to desktop, not "
                             f"{self.sandbox.type}")
        size = len(self.model_dump_json())
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"spec of {size >> 20} MiB is over the limit of {MAX_SPEC_BYTES >> 20} MiB: "
                             "keep large files in task repos or images")
        return self

    @property
    def n_episodes(self) -> int:
        return len(self.tasks) * self.rollouts

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        """Read a spec from YAML or JSON; `tasks_file` (relative to the spec) is inlined.

        Raises:
            SpecError: unreadable file or invalid spec, with every problem listed.
        """
        path = Path(path)
        try:
            data = _read_structured(path)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read spec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise SpecError(f"spec {path} must be a mapping, got {type(data).__name__}")
        tasks_file = data.pop("tasks_file", None)
        select = data.pop("tasks_select", None)
        if select is not None and tasks_file is None:
            raise SpecError(f"spec {path}: tasks_select needs tasks_file")
        if tasks_file is not None:
            from megaflow.envs.swebench_data import Selection

            try:
                selection = Selection.model_validate(select) if select is not None else None
            except ValidationError as exc:
                raise SpecError(f"invalid tasks_select in {path}:\n{format_errors(exc)}") from exc
            data["tasks"] = load_tasks(path.parent / tasks_file, selection)
        elif isinstance(data.get("tasks"), list):
            resolve_repo_paths(data["tasks"], path.parent)
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: dict, source: str = "spec") -> RunSpec:
        """Validate a dict; raise SpecError with a readable list of problems."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(f"invalid {source}:\n{format_errors(exc)}") from exc


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:20]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def load_tasks(path: Path, selection=None) -> list[dict]:
    """Tasks from a JSONL, JSON, YAML or Parquet file, a saved Hugging Face dataset, or a directory of files.

    Records in the published SWE-bench shape (SWE-bench, SWE-Gym, SWE-rebench) become
    SWE tasks (`megaflow.envs.swebench_data`); `selection` (a ``Selection``) picks
    instances. Relative local-directory ``repo`` sources of SWE tasks are made
    absolute against the file's directory, so that the stored task means the same
    to every worker.
    """
    from megaflow.envs import swebench_data

    path = Path(path)
    try:
        records = swebench_data.read_records(path, selection.split if selection else None)
    except (OSError, ValueError, ImportError) as exc:
        raise SpecError(f"cannot read tasks {path}: {exc}") from exc
    if records is None and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".yaml", ".yml", ".parquet"))
        records = [task for f in files for task in load_tasks(f)]
    if records is None:
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                records = _read_structured(path)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read tasks {path}: {exc}") from exc
        if isinstance(records, dict) and "tasks" in records:
            # A task file's `defaults` apply to each of its tasks (a task's own fields win).
            defaults = records.get("defaults") or {}
            records = records["tasks"]
            if isinstance(defaults, dict) and isinstance(records, list):
                records = [{**defaults, **r} if isinstance(r, dict) else r for r in records]
    if not isinstance(records, list):
        raise SpecError(f"tasks file {path} must hold a list of tasks")
    try:
        records = swebench_data.select(records, selection)
    except (ValueError, TypeError) as exc:  # a bad id list or regular expression
        raise SpecError(f"tasks_select on {path}: {exc}") from exc
    records = [swebench_data.convert(r, selection) if swebench_data.is_published(r) else r for r in records]
    return resolve_repo_paths(records, path.parent)


def resolve_repo_paths(tasks: list, base: Path) -> list:
    """Make relative local-directory ``repo`` sources of SWE tasks absolute against `base`."""
    from megaflow.envs.repos import RepoSource

    for task in tasks:
        repo = task.get("repo") if isinstance(task, dict) and task.get("kind") == "swe" else None
        if not isinstance(repo, str) or not repo.strip():
            continue
        try:
            kind = RepoSource.parse(repo).kind
        except ValueError:
            continue  # SWETask validation reports it
        if kind == "dir" and not Path(repo).expanduser().is_absolute():
            task["repo"] = str((base / repo).resolve())
    return tasks


def _read_structured(path: Path):
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:  # not a ValueError: make it one, so callers report it as bad input
            raise ValueError(f"not valid YAML: {exc}") from exc
    return json.loads(text)
