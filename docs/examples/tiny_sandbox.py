"""A worked example of a sandbox backend: one bubblewrap jail per sandbox, a directory each.

It implements `megaflow.sandbox.base.SandboxBackend` and `Sandbox` in about 150
lines and passes every check of `megaflow.sandbox.conformance` (run by
`tests/test_docs_examples.py`). It is deliberately smaller than the shipped
`megaflow.sandbox.local` backend: no memory, pid or cpu limits, no warm pool, no
journal of who owns which directory. Use it to learn the contract, not in production.

Each sandbox is a directory ``<root>/<id>/work`` bound at ``config.workdir`` inside a
bubblewrap jail (new user, pid, network, mount namespaces; the host's ``/usr``
read-only), with its labels in ``<root>/<id>/labels.json`` so that `list_ids` can
find it after a crash.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from megaflow.errors import SandboxClosedError, SandboxNotFoundError
from megaflow.sandbox.base import ExecResult, SandboxConfig
from megaflow.sandbox.common import OutputCap, exec_result, pump, workdir_relpath

#: The uid commands run as inside the jail: never root (a conformance check).
SANDBOX_UID = 1000


class TinyBackend:
    """Creates bubblewrap sandboxes under `root`.

    Args:
        root: A directory of this backend's own; every sandbox is a folder in it.
    """

    name = "tiny"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> TinySandbox:
        """Make the sandbox's directory and record its labels."""
        sandbox_id = f"tiny-{secrets.token_hex(6)}"
        (self.root / sandbox_id / "work").mkdir(parents=True)
        (self.root / sandbox_id / "labels.json").write_text(json.dumps(labels))
        return TinySandbox(self, sandbox_id, config)

    def attach(self, sandbox_id: str, config: SandboxConfig) -> TinySandbox:
        """Reopen a sandbox by id (any process on this host may).

        Raises:
            SandboxNotFoundError: it no longer exists.
        """
        if not (self.root / sandbox_id / "labels.json").is_file():
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")
        return TinySandbox(self, sandbox_id, config)

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of the sandboxes carrying every one of `labels` (what the reaper asks)."""
        found = []
        for meta in self.root.glob("*/labels.json"):
            have = json.loads(meta.read_text())
            if all(have.get(k) == v for k, v in labels.items()):
                found.append(meta.parent.name)
        return sorted(found)

    def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox's directory. Idempotent."""
        shutil.rmtree(self.root / sandbox_id, ignore_errors=True)


class TinySandbox:
    """One sandbox: a directory, and a fresh jail for every command."""

    def __init__(self, backend: TinyBackend, sandbox_id: str, config: SandboxConfig):
        self.id = sandbox_id
        self.config = config
        self._dir = backend.root / sandbox_id
        self._backend = backend
        self._closed = False

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Run `cmd` with ``bash -lc`` in the jail; at the deadline its process group is killed (exit 124)."""
        work = self._work()
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--bind", str(work), self.config.workdir, "--chdir", self.config.workdir,
                "bash", "-lc", cmd]
        # A cleared environment: the worker's own variables (its keys) never reach a command.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.config.workdir, **self.config.env}
        out, err = OutputCap(self.config.max_output_bytes), OutputCap(self.config.max_output_bytes)
        started = time.monotonic()
        # A session of its own, so that the kill at the deadline reaches every child.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        with proc:
            timed_out = pump(proc, out, err, started + timeout)
        return exec_result(124 if timed_out else proc.returncode, out, err, timed_out, started)

    def write_file(self, path: str, data: bytes) -> None:
        """Write bytes under the work directory, making parents.

        Raises:
            PermissionError: the path (or a symlink on it) leads outside the work directory.
        """
        target = self._host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._host_path(path)  # again: a parent made above must not be a symlink either
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def read_file(self, path: str) -> bytes:
        """Read bytes from under the work directory.

        Raises:
            FileNotFoundError: no such file.
            PermissionError: the path leads outside the work directory.
        """
        target = self._host_path(path)
        if not target.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return target.read_bytes()

    def reset(self) -> None:
        """Empty the work directory: the state right after `create`."""
        work = self._work()
        shutil.rmtree(work)
        work.mkdir()

    def close(self) -> None:
        """Destroy the sandbox. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.destroy(self.id)

    def _work(self) -> Path:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        work = self._dir / "work"
        if not work.is_dir():
            raise SandboxNotFoundError(f"sandbox {self.id} no longer exists")
        return work

    def _host_path(self, path: str) -> Path:
        """Where a sandbox path lies on the host, refusing anything that resolves outside the work dir."""
        work = self._work()
        rel = workdir_relpath(self.config.workdir, path)
        if rel is None:
            raise PermissionError(errno.EACCES, "only the work directory is reachable", path)
        # resolve() follows symlinks the agent made: `ln -s /etc x` must not let a write land on the host.
        target = (work / rel).resolve()
        if target != work.resolve() and work.resolve() not in target.parents:
            raise PermissionError(errno.EACCES, "path leads outside the work directory", path)
        return target
