"""The local backend: bubblewrap on this host, the embedded default.

Each sandbox is a directory ``<root>/sandboxes/<id>/`` holding ``work/`` (bound
writable at ``config.workdir``), ``pristine/`` (what `reset` restores), ``etc/`` (a
synthetic passwd and group) and ``labels.json`` (read by `list_ids` and `attach`, also
from other processes). Nothing runs between calls: every `exec` is a fresh bubblewrap
tree in new mount, pid, ipc, uts, cgroup and (unless ``config.network``) net
namespaces, with read-only system directories, a private ``/tmp`` and a cleared
environment. When its first process ends or the deadline passes, the pid namespace
goes and every process in it with it, so nothing outlives the call.

Limits are rlimits set by ``prlimit`` as the last step before the command:
``RLIMIT_NPROC`` (``config.pids``), ``RLIMIT_AS`` (``config.memory_mb``),
``RLIMIT_FSIZE`` (``max_file_mb``), ``RLIMIT_CPU`` (a backstop to the wall-clock
deadline) and ``nice 10``. The kernel counts ``RLIMIT_NPROC`` per user namespace and
uid, so the count is per call, not shared with other sandboxes, but it never applies
to processes whose host uid is 0. So when MegaFlow runs as root, the tree is nested:
an outer bwrap (as root) builds the mounts and namespaces, ``setpriv`` drops to
``host_uid`` (``MEGAFLOW_SANDBOX_UID``, default 65534), and an inner unprivileged bwrap
adds the user namespace (uid 1000 inside) in which the limits apply. Run unprivileged,
a single bwrap does both.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path, PurePosixPath

from megaflow.config import Settings
from megaflow.errors import SandboxClosedError, SandboxError, SandboxNotFoundError
from megaflow.sandbox.base import MODEL_SOCKET_MOUNT, ExecResult, SandboxConfig
from megaflow.sandbox.common import OutputCap, exec_result, kill_group, pump, workdir_relpath

logger = logging.getLogger(__name__)

#: The agent's uid and gid inside the sandbox.
SANDBOX_UID = 1000

_ID_RE = re.compile(r"^mf-[0-9a-f]{12}$")
#: Holds ``python`` -> the host's ``/usr/bin/python3`` (hosts often ship no ``python``,
#: task commands say ``python``: #15 point 3); last on PATH, so a real one wins.
PYTHON_LINK_DIR = "/opt/megaflow/bin"
_PATH = f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{PYTHON_LINK_DIR}"
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Only what programs need to start and find libraries, certificates and time zones:
# the rest of the host's /etc (shadow, credentials, service configs) stays out.
_ETC_PATTERNS = tuple(
    ["alternatives", "ca-certificates", "ca-certificates.conf", "debian_version", "hosts", "java-*", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "magic", "magic.mime", "mime.types", "nsswitch.conf", "os-release", "perl", "protocols", "python3*", "services", "ssl", "timezone"]
)
_NETWORK_ETC = ("resolv.conf", "gai.conf", "host.conf")
# bwrap, setpriv and prlimit fail before the command starts with exit 1 and this prefix.
_SETUP_PREFIXES = (b"bwrap: ", b"setpriv: ", b"prlimit: ")
_READ_CAP = 256 << 20
_SHM_MB = 64


class LocalBackend:
    """Creates bubblewrap sandboxes under ``<root>/sandboxes``.

    Args:
        root: Data directory; default ``Settings.data_dir`` (``~/.megaflow``).
        host_uid: Host uid the sandboxed processes run as when MegaFlow runs as root;
            default ``Settings.sandbox_uid`` (65534, nobody); a dedicated uid is
            better, since files in work dirs belong to it. Ignored when not root.
        max_file_mb: Largest file a sandboxed process may write (``RLIMIT_FSIZE``).
    """

    name = "local"

    def __init__(self, root: Path | None = None, *, host_uid: int | None = None, max_file_mb: int = 1024):
        settings = Settings() if root is None or host_uid is None else None
        self.root = Path(root if root is not None else settings.data_dir) / "sandboxes"
        self.privileged = os.geteuid() == 0
        self.host_uid = os.geteuid()
        if self.privileged:
            self.host_uid = host_uid if host_uid is not None else settings.sandbox_uid
            if self.host_uid == 0:
                raise ValueError("host_uid must not be 0: pids limits do not apply to root")
        self.max_file_mb = max_file_mb
        self._tools = {name: shutil.which(name, path=_PATH) for name in ("bwrap", "setpriv", "nice", "prlimit")}
        self._spawned: list[subprocess.Popen] = []
        self._spawn_lock = threading.Lock()

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> LocalSandbox:
        """Create a sandbox and check that a command starts in it.

        Raises:
            SandboxError: bubblewrap is missing or cannot start on this host.
        """
        missing = [n for n, path in self._tools.items() if path is None and (self.privileged or n != "setpriv")]
        if missing:
            raise SandboxError(f"local sandbox needs {', '.join(missing)} (apt-get install bubblewrap util-linux)")
        if config.model_socket_dir:  # bound into the sandbox before the proxy's first socket is there
            os.makedirs(config.model_socket_dir, mode=0o755, exist_ok=True)
        sandbox_id = f"mf-{secrets.token_hex(6)}"
        try:
            self._make_dir(self.root / sandbox_id, config, {"id": sandbox_id, "labels": dict(labels)})
        except OSError as exc:
            _rmtree(self.root / sandbox_id)
            raise SandboxError(f"cannot create sandbox directory under {self.root}: {exc}") from exc
        sandbox = LocalSandbox(self, sandbox_id, config)
        try:
            probe = sandbox.exec("true", timeout=30)
            if probe.exit_code != 0:
                raise SandboxError(f"sandbox {sandbox_id} does not start: {probe.stderr.strip()}")
        except BaseException:
            sandbox.close()
            raise
        logger.debug("created local sandbox %s labels=%s", sandbox_id, labels)
        return sandbox

    def _make_dir(self, path: Path, config: SandboxConfig, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.mkdir(mode=0o700)
        for sub in ("work", "pristine", "etc"):
            (path / sub).mkdir()
        (path / "etc" / "passwd").write_text(
            f"root:x:0:0:root:/root:/bin/bash\nagent:x:{SANDBOX_UID}:{SANDBOX_UID}:agent:{config.workdir}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (path / "etc" / "group").write_text(f"root:x:0:\nagent:x:{SANDBOX_UID}:\nnogroup:x:65534:\n")
        self.give(path / "work")
        tmp = path / "labels.json.tmp"
        tmp.write_text(json.dumps({**meta, "created_at": time.time(), "workdir": config.workdir}))
        tmp.replace(path / "labels.json")  # atomic: other processes never read half a file

    def attach(self, sandbox_id: str, config: SandboxConfig) -> LocalSandbox:
        """Reopen a sandbox by id.

        Raises:
            SandboxNotFoundError: no such sandbox under this root.
        """
        if _read_meta(self.root, sandbox_id) is None:
            raise SandboxNotFoundError(f"no local sandbox {sandbox_id!r} under {self.root}")
        return LocalSandbox(self, sandbox_id, config)

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of the sandboxes under this root carrying all `labels`."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            meta = _read_meta(self.root, name)
            if meta is not None and all(meta.get("labels", {}).get(k) == v for k, v in labels.items()):
                found.append(name)
        return found

    def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox's directory. Idempotent."""
        if not _ID_RE.match(sandbox_id):
            logger.warning("not a local sandbox id, nothing destroyed: %r", sandbox_id)
            return
        path = self.root / sandbox_id
        _kill_spawned(path)
        trash = self.root / f".trash-{sandbox_id}-{secrets.token_hex(4)}"
        try:
            path.rename(trash)  # gone for list_ids and attach at once, however long rmtree takes
        except FileNotFoundError:
            return
        _rmtree(trash, fix_modes=not self.privileged)
        logger.debug("destroyed local sandbox %s", sandbox_id)

    def keep_spawned(self, proc: subprocess.Popen) -> None:
        """Hold a spawned tree's handle until it exits, so that it is reaped (no zombies)."""
        with self._spawn_lock:
            self._spawned = [p for p in self._spawned if p.poll() is None]
            self._spawned.append(proc)

    def give(self, path: Path) -> None:
        """Hand a host-side path to the sandbox's host uid (only needed as root)."""
        if self.privileged:
            os.chown(path, self.host_uid, self.host_uid, follow_symlinks=False)

    def command(self, sandbox_dir: Path, config: SandboxConfig, argv: list[str], timeout: float) -> list[str]:
        """The host command line that runs `argv` inside the sandbox."""
        tools = self._tools
        cpu_s = math.ceil(timeout * max(config.cpus, 1.0)) + 1
        limits = [
            f"--nproc={config.pids}",
            f"--as={config.memory_mb << 20}",
            f"--fsize={self.max_file_mb << 20}",
            f"--cpu={cpu_s}",
            "--core=0",
        ]
        user = [
            "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns",
            "--die-with-parent", "--chdir", config.workdir, tools["prlimit"], *limits, "--", *argv,
        ]  # fmt: skip
        namespaces = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        namespaces += ["--hostname", "megaflow", "--die-with-parent", "--new-session"]
        if not config.network:
            namespaces.append("--unshare-net")
        outer = [tools["nice"], "-n", "10", tools["bwrap"], *self._mounts(sandbox_dir, config), *namespaces]
        if not self.privileged:
            return [*outer, *user]
        # Root mounts (it can reach any data dir), then drops to host_uid for the
        # inner bwrap, whose user namespace makes RLIMIT_NPROC count and apply.
        uid = str(self.host_uid)
        drop = [tools["setpriv"], f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        caps = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return [*outer, *caps, *drop, tools["bwrap"], "--dev-bind", "/", "/", *user]

    def _mounts(self, sandbox_dir: Path, config: SandboxConfig) -> list[str]:
        args: list[str] = []
        for name in _SYSTEM_DIRS:
            host = Path("/", name)
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        if Path("/usr/bin/python3").exists():
            args += ["--perms", "0755", "--dir", PYTHON_LINK_DIR]
            args += ["--symlink", "/usr/bin/python3", f"{PYTHON_LINK_DIR}/python"]
        args += ["--perms", "0755", "--dir", "/etc"]
        patterns = _ETC_PATTERNS + (_NETWORK_ETC if config.network else ())
        for name in sorted(os.listdir("/etc")):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for name in ("passwd", "group"):
            args += ["--ro-bind", str(sandbox_dir / "etc" / name), f"/etc/{name}"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", str(config.memory_mb << 20), "--tmpfs", "/tmp"]
        args += ["--perms", "1777", "--size", str(_SHM_MB << 20), "--tmpfs", "/dev/shm"]
        for parent in reversed(PurePosixPath(config.workdir).parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        for path in config.ro_binds:  # task environments (megaflow.envs.environments), same path inside
            for parent in reversed(PurePosixPath(path).parents[:-1]):
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind-try", path, path]
        if config.model_socket_dir:  # a CLI agent's model proxy (megaflow.hops.cli_proxy)
            args += ["--perms", "0755", "--dir", "/run", "--ro-bind", config.model_socket_dir, MODEL_SOCKET_MOUNT]
        args += ["--bind", str(sandbox_dir / "work"), config.workdir]
        # Run unprivileged, the sandbox user owns the tmpfs root and /dev: make them
        # read-only so that only the work dir, /tmp and /dev/shm take writes.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        return args


class LocalSandbox:
    """One local sandbox; obtained from `LocalBackend.create` or `attach`."""

    def __init__(self, backend: LocalBackend, sandbox_id: str, config: SandboxConfig):
        self.id = sandbox_id
        self.config = config
        self._backend = backend
        self._dir = backend.root / sandbox_id
        self._closed = False

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Run `cmd` with ``bash -lc`` in the work directory; see `Sandbox.exec`."""
        self._check_open()
        started = time.monotonic()
        code, out, err, timed_out = self._run(["bash", "-lc", cmd], timeout, self.config.max_output_bytes)
        return exec_result(code, out, err, timed_out, started)

    def spawn(self, cmd: str, timeout: float) -> None:
        """Start `cmd` (``bash -lc``) in the background and return at once (CLI agents).

        Its output goes to ``spawn.log`` beside the work directory (never read back into
        a worker). The tree is killed by `destroy` (its process group is recorded in
        ``spawn.pid``); `timeout` only caps its CPU time. The sandbox's own rule (nothing
        outlives a call) holds again once it exits: no exec or write_file is sent to a
        sandbox while its agent program runs.
        """
        self._check_open()
        command = self._backend.command(self._dir, self.config, ["bash", "-lc", cmd], max(float(timeout), 1.0))
        with open(self._dir / "spawn.log", "ab") as log:
            try:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env=self._env(), start_new_session=True)
            except OSError as exc:
                raise SandboxError(f"cannot start bubblewrap: {exc}") from exc
        (self._dir / "spawn.pid").write_text(str(proc.pid))
        self._backend.keep_spawned(proc)

    def write_file(self, path: str, data: bytes) -> None:
        """Write bytes inside the work directory (parents are created).

        Raises:
            PermissionError: the path is outside the work directory or leaves it
                through ".." or a symlink.
        """
        self._check_open()
        rel = workdir_relpath(self.config.workdir, path)
        if rel is None:
            raise PermissionError(errno.EACCES, "only the work directory is writable", path)
        target = self._host_path(rel)
        missing = []
        parent = target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir()
            self._backend.give(directory)
        fd = _open_regular(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._backend.give(target)

    def read_file(self, path: str) -> bytes:
        """Read bytes; paths outside the work directory are read inside the sandbox.

        Raises:
            FileNotFoundError: no such file.
            PermissionError: the path leaves the work directory through ".." or a
                symlink, or the sandbox user may not read it.
        """
        self._check_open()
        rel = workdir_relpath(self.config.workdir, path)
        if rel is None:
            return self._read_inside(path)
        fd = _open_regular(self._host_path(rel), os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def reset(self) -> None:
        """Restore the work directory to its state right after creation."""
        self._check_open()
        work = self._dir / "work"
        trash = self._dir / f"trash-{secrets.token_hex(4)}"
        work.rename(trash)
        shutil.copytree(self._dir / "pristine", work, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(work):
            for name in [".", *dirnames, *filenames]:
                self._backend.give(Path(dirpath, name))
        _rmtree(trash, fix_modes=not self._backend.privileged)

    def close(self) -> None:
        """Remove the sandbox. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.destroy(self.id)

    def _env(self) -> dict[str, str]:
        env = {"PATH": _PATH, "HOME": self.config.workdir, "USER": "agent", "LOGNAME": "agent", "LANG": "C.UTF-8"}
        env.update(self.config.env)
        return env

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if not (self._dir / "labels.json").exists():
            raise SandboxNotFoundError(f"sandbox {self.id} no longer exists")

    def _host_path(self, rel: str) -> Path:
        work = os.path.realpath(self._dir / "work")
        # No sandboxed process outlives an exec, so nothing can swap a symlink in
        # between this check and the open that follows.
        target = os.path.realpath(os.path.join(work, rel))
        if target != work and not target.startswith(work + os.sep):
            raise PermissionError(errno.EACCES, "path leaves the work directory through a symlink", rel)
        return Path(target)

    def _read_inside(self, path: str) -> bytes:
        code, out, err, timed_out = self._run(["cat", "--", path], 60.0, _READ_CAP)
        if code == 0 and not out.truncated:
            return out.data()
        message = err.text().strip()
        if timed_out or out.truncated:
            raise OSError(errno.EFBIG, f"cannot read more than {_READ_CAP} bytes in 60 s", path)
        errors = (("No such", errno.ENOENT), ("Permission denied", errno.EACCES), ("Is a dir", errno.EISDIR))
        for needle, number in errors:
            if needle in message:
                raise OSError(number, message, path)  # becomes FileNotFoundError etc. by errno
        raise OSError(errno.EIO, message or f"cat exited {code}", path)

    def _run(self, argv: list[str], timeout: float, cap: int) -> tuple[int, OutputCap, OutputCap, bool]:
        timeout = max(float(timeout), 0.001)
        command = self._backend.command(self._dir, self.config, argv, timeout)
        out, err = OutputCap(cap), OutputCap(cap)
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._env(), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise SandboxError(f"cannot start bubblewrap: {exc}") from exc
        # Killing the outer bwrap's group is enough: --die-with-parent takes its pid
        # namespace down, and every process the command started, whatever its session.
        try:
            timed_out = pump(proc, out, err, time.monotonic() + timeout)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                kill_group(proc)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if timed_out:
            return 124, out, err, True
        if code == 1 and bytes(err.head).startswith(_SETUP_PREFIXES):
            raise SandboxError(f"sandbox {self.id} failed to start: {err.text().strip()}")
        return (128 - code if code < 0 else code), out, err, False


def _kill_spawned(sandbox_dir: Path) -> None:
    """Kill the background tree `LocalSandbox.spawn` started in this sandbox, if it still runs."""
    try:
        pid = int((sandbox_dir / "spawn.pid").read_text())
        # A recycled pid is not ours: the tree's command line names the sandbox's directory.
        if str(sandbox_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _open_regular(path: Path, flags: int) -> int:
    # O_NONBLOCK so that a FIFO planted by the agent cannot hang the worker.
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


def _read_meta(root: Path, sandbox_id: str) -> dict | None:
    if not _ID_RE.match(sandbox_id):
        return None
    try:
        return json.loads((root / sandbox_id / "labels.json").read_text())
    except (OSError, ValueError):
        return None


def _rmtree(path: Path, fix_modes: bool = False) -> None:
    if fix_modes:
        # An agent may drop its own write or search bits on a directory; as the same
        # uid we may restore them, and rmtree needs them.
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                child = os.path.join(dirpath, name)
                if not os.path.islink(child):
                    os.chmod(child, 0o700)

    def onerror(func, failed_path, exc_info) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)
