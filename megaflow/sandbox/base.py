"""The Sandbox interface: where an agent's commands run.

A sandbox is created by a backend (`SandboxBackend.create`) from a `SandboxConfig`
and used through the small `Sandbox` protocol. Every backend must pass the one
conformance suite in `megaflow.sandbox.conformance`.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import posixpath
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Marker inserted where oversized output was cut; visible to the agent on purpose.
TRUNCATION_MARKER = "\n[... output truncated by megaflow: {omitted} bytes omitted ...]\n"


class ExecResult(BaseModel):
    """What one command produced."""

    model_config = ConfigDict(extra="forbid")

    exit_code: int = Field(description="Process exit code; 124 when the timeout killed it.")
    stdout: str = Field(default="", description="Standard output (UTF-8, errors replaced), truncated with a marker.")
    stderr: str = Field(default="", description="Standard error, truncated like stdout.")
    timed_out: bool = Field(default=False, description="True when the deadline killed the process tree.")
    truncated: bool = Field(default=False, description="True when stdout or stderr was cut.")
    duration_s: float = Field(default=0.0, description="Wall time of the command.")

    @property
    def output(self) -> str:
        """stdout then stderr, joined by a newline when both are present: what an agent sees."""
        if not self.stderr:
            return self.stdout
        return f"{self.stdout}\n{self.stderr}" if self.stdout else self.stderr


#: Directories a work directory must not be, nor lie under: the sandbox's own system.
_SYSTEM_PATHS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                 "/sys", "/usr", "/var/lib", "/var/run")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class SandboxConfig(BaseModel):
    """How to make one sandbox. One config object for every backend."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["local", "docker", "memory", "desktop"] = Field(
        default="local", description="Backend: bubblewrap on this host, a Docker container, the in-memory fake, "
        "or a Docker container running an X desktop (computer-use tasks; image megaflow/desktop)."
    )
    image: str = Field(default="megaflow/base", description="Docker image (docker backend only).")
    workdir: str = Field(default="/work", description="Writable working directory inside the sandbox.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every command.")
    memory_mb: int = Field(default=1024, ge=16, le=1_048_576, description="Memory limit.")
    pids: int = Field(default=256, ge=8, le=65_536, description="Process count limit (fork bombs stop here).")
    cpus: float = Field(default=1.0, gt=0, le=256, description="CPU limit in cores.")
    network: bool = Field(default=False, description="Allow network access. Off by default.")
    max_output_bytes: int = Field(default=65_536, ge=256, le=64 << 20,
                                  description="Cap per stream; beyond it output is cut.")
    ro_binds: list[str] = Field(
        default_factory=list,
        description="Host directories bound read-only at the same path (local backend; a task environment's "
        "virtualenv). A missing one is skipped.")
    model_socket_dir: str | None = Field(
        default=None,
        description="Host directory holding the model proxy's Unix socket, bound read-only at "
        "/run/megaflow in the sandbox (CLI agents: their only way out). Set by the runtime, not by specs.")
    mode: Literal["ephemeral", "persistent"] = Field(
        default="ephemeral", description="Ephemeral: destroyed when the episode ends; persistent: reset and reused."
    )
    pool_size: int = Field(
        default=8,
        ge=0,
        le=4096,
        description="Persistent mode: idle sandboxes an env host keeps for this config; beyond it a released "
        "sandbox is destroyed. Not part of the pool key: runs that differ only here share one pool.",
    )


    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        norm = posixpath.normpath(value) if value else ""
        if not value.startswith("/") or norm == "/" or norm != value.rstrip("/"):
            raise ValueError(f"workdir {value!r} must be an absolute, normalised path other than /")
        if any(norm == p or norm.startswith(p + "/") for p in _SYSTEM_PATHS):
            raise ValueError(f"workdir {value!r} would shadow the sandbox's system directories")
        return norm

    @field_validator("ro_binds")
    @classmethod
    def _ro_binds(cls, value: list[str]) -> list[str]:
        for path in value:
            norm = posixpath.normpath(path)
            if not path.startswith("/") or norm != path.rstrip("/") or any(
                    norm == p or norm.startswith(p + "/") for p in _SYSTEM_PATHS if p != "/var/lib"):
                raise ValueError(f"ro_binds path {path!r} must be absolute, normalised, outside system directories")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not a valid name")
        return value


@runtime_checkable
class Sandbox(Protocol):
    """One isolated place to run commands.

    Raises (all methods):
        SandboxClosedError: the sandbox was closed.
        SandboxError: the backend failed (an infra failure, retryable elsewhere).
    """

    id: str

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Run `cmd` with `bash -lc` in the work directory.

        A timeout kills the whole process tree and returns exit code 124 with
        `timed_out=True`; it does not raise.
        """

    def write_file(self, path: str, data: bytes) -> None:
        """Write bytes to `path` (relative paths are under the work directory)."""

    def read_file(self, path: str) -> bytes:
        """Read bytes from `path`.

        Raises:
            FileNotFoundError: no such file.
        """

    def reset(self) -> None:
        """Restore the sandbox to the state it had right after creation."""

    def close(self) -> None:
        """Release every resource. Idempotent."""


#: Where a sandbox sees `SandboxConfig.model_socket_dir`.
MODEL_SOCKET_MOUNT = "/run/megaflow"


class SandboxBackend(Protocol):
    """Creates sandboxes of one kind and finds the ones it left behind."""

    name: str

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> Sandbox:
        """Create and start a sandbox labelled with `labels` (run and episode ids).

        A backend may take keyword options of its own after these, defaulting to the
        plain behaviour: the Docker backend's ``defer_seed=True`` leaves the work
        directory's content to arrive with the first command (one engine round trip
        fewer); such a sandbox must be settled (``settle()``, or any other operation)
        before another process attaches it (`attach`), which would otherwise find it
        empty.
        """

    def attach(self, sandbox_id: str, config: SandboxConfig) -> Sandbox:
        """Reopen a sandbox created earlier (possibly by another process on this host).

        Raises:
            SandboxNotFoundError: it no longer exists.
        """

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of live sandboxes carrying all `labels` (for the reaper)."""

    def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox by id. Idempotent."""
