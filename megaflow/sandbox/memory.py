"""The in-memory sandbox fake, for unit tests and benchmarks: no processes at all.

Files live in a dict (bytes, so binary is fine). `exec` interprets a deliberately small
shell subset, enough for the conformance suite and for scripted agents:

* commands: ``true false echo printf cat pwd cd exit sleep seq head mkdir export``;
  anything else exits 127 with "command not found", as bash does;
* ``$VAR``, ``${VAR}`` and ``$?``; single and double quotes; backslash escapes;
* ``;``, ``&&``, ``||``, ``|`` and the redirections ``>``, ``>>``, ``2>``, ``>&2``,
  ``2>&1``; ``#`` comments.

Background jobs, subshells and command substitution exit 2 with "unsupported syntax"
rather than pretending. ``sleep`` past the deadline sleeps only until the deadline
and ends the command with exit 124 and ``timed_out=True``.

Sandboxes are found by id in the backend's ``store``: `attach` works for any backend
built on the same store (by default, its own).
"""

from __future__ import annotations

import errno
import posixpath
import secrets
import time
from dataclasses import dataclass, field

from megaflow.errors import SandboxClosedError, SandboxNotFoundError
from megaflow.sandbox.base import ExecResult, SandboxConfig
from megaflow.sandbox.common import OutputCap, exec_result, workdir_relpath
from megaflow.sandbox.memory_shell import Shell, ShellTimeout


@dataclass
class MemoryState:
    """Everything one fake sandbox holds."""

    labels: dict[str, str]
    initial_dirs: frozenset[str]
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)


class MemoryBackend:
    """Creates in-memory sandboxes.

    Args:
        store: Where sandboxes are kept by id; pass one dict to several backends so
            they can `attach` each other's sandboxes.
    """

    name = "memory"

    def __init__(self, store: dict[str, MemoryState] | None = None):
        self.store = store if store is not None else {}

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> MemorySandbox:
        """Create an empty sandbox."""
        sandbox_id = f"mem-{secrets.token_hex(6)}"
        workdir = posixpath.normpath(config.workdir)
        dirs = {"/", "/tmp", workdir}
        while workdir != "/":
            workdir = posixpath.dirname(workdir)
            dirs.add(workdir)
        self.store[sandbox_id] = MemoryState(labels=dict(labels), initial_dirs=frozenset(dirs), dirs=set(dirs))
        return MemorySandbox(self, sandbox_id, config)

    def attach(self, sandbox_id: str, config: SandboxConfig) -> MemorySandbox:
        """Reopen a sandbox of this store.

        Raises:
            SandboxNotFoundError: no such sandbox.
        """
        if sandbox_id not in self.store:
            raise SandboxNotFoundError(f"no memory sandbox {sandbox_id!r}")
        return MemorySandbox(self, sandbox_id, config)

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of the sandboxes carrying all `labels`."""
        return sorted(
            sid for sid, state in self.store.items() if all(state.labels.get(k) == v for k, v in labels.items())
        )

    def destroy(self, sandbox_id: str) -> None:
        """Forget a sandbox. Idempotent."""
        self.store.pop(sandbox_id, None)


class MemorySandbox:
    """One in-memory sandbox."""

    def __init__(self, backend: MemoryBackend, sandbox_id: str, config: SandboxConfig):
        self.id = sandbox_id
        self.config = config
        self._backend = backend
        self._closed = False

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Interpret `cmd`; see the module docstring for what is understood."""
        state = self._state()
        started = time.monotonic()
        out, err = OutputCap(self.config.max_output_bytes), OutputCap(self.config.max_output_bytes)
        env = {"HOME": self.config.workdir, "PATH": "/usr/local/bin:/usr/bin:/bin", "USER": "agent", **self.config.env}
        shell = Shell(state.files, state.dirs, self.config.workdir, env, out, err, deadline=started + timeout)
        timed_out = False
        try:
            code = shell.run(cmd)
        except ShellTimeout:
            code, timed_out = 124, True
        return exec_result(code, out, err, timed_out, started)

    def write_file(self, path: str, data: bytes) -> None:
        """Write bytes inside the work directory, creating parents.

        Raises:
            PermissionError: the path is outside the work directory.
        """
        state = self._state()
        rel = workdir_relpath(self.config.workdir, path)
        if rel is None:
            raise PermissionError(errno.EACCES, "only the work directory is writable", path)
        target = posixpath.normpath(posixpath.join(self.config.workdir, rel))
        if target in state.dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        parent = posixpath.dirname(target)
        while parent not in state.dirs:
            if parent in state.files:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
            state.dirs.add(parent)
            parent = posixpath.dirname(parent)
        state.files[target] = bytes(data)

    def read_file(self, path: str) -> bytes:
        """Read bytes.

        Raises:
            FileNotFoundError: no such file.
            PermissionError: a relative path climbs out of the work directory.
        """
        state = self._state()
        rel = workdir_relpath(self.config.workdir, path)
        target = "/" + posixpath.normpath(path).lstrip("/") if rel is None else posixpath.join(self.config.workdir, rel)
        target = posixpath.normpath(target)
        if target in state.dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if target not in state.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return state.files[target]

    def reset(self) -> None:
        """Drop every file; keep the directories that existed at creation."""
        state = self._state()
        state.files.clear()
        state.dirs = set(state.initial_dirs)

    def close(self) -> None:
        """Forget the sandbox. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.destroy(self.id)

    def _state(self) -> MemoryState:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        state = self._backend.store.get(self.id)
        if state is None:
            raise SandboxNotFoundError(f"sandbox {self.id} no longer exists")
        return state
