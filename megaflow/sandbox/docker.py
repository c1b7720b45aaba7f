"""Docker sandboxes: the production backend (architecture §6, inner isolation layer).

Every container is locked down by default: no network, uid 1000, all capabilities
dropped, ``no-new-privileges``, read-only root, memory (swap included), pids and CPU
limits. The work directory is a tmpfs-backed volume: writable, charged to the
container's memory limit, gone with the container, and (unlike a plain ``--tmpfs``
mount) reachable by the archive API that `write_file` and `read_file` use; ``/tmp``
is a plain tmpfs. The keep-alive process runs under Docker's init, which reaps
orphans.

The tmpfs hides what the image holds at the work directory, so that content (a
tar, `SeedCache`) is copied in: at create by default, one ``put_archive``. With
``create(..., defer_seed=True)`` it is instead streamed on the stdin of the first
`DockerSandbox.exec`, which extracts it and then runs the command in the same exec:
one engine round trip fewer for the usual episode, whose first act is a command.
Any other first operation (`DockerSandbox.settle` included) copies it the old way.

"No network" is a network namespace of the sandbox's own holding only loopback.
The engine's way to make one (``--network none``) goes through libnetwork, which
creates and mounts the namespace, and a prestart hook that re-executes dockerd:
about half the cost of a create. So sandboxes are created with the engine's
networking disabled (``NetworkDisabled``, mode still ``none``): runc makes the
namespace itself, loopback only, one per sandbox, as before. What the engine no
longer writes is ``/etc/hosts`` (``localhost``): it is bind-mounted read-only from a
file in the engine's ``megaflow-etc`` volume (`EtcHosts`). Where that file cannot
be provided, sandboxes fall back to ``--network none``.

Docker's exec has no timeout, so `DockerSandbox.exec` keeps its own deadline. Each
command carries a unique ``MEGAFLOW_EXEC_ID`` in its environment; at the deadline a
second exec (`KILL_SCRIPT`) SIGKILLs every process holding that id, every process in
their sessions and every process that cleared its environment since the command
began. The same happens when the command exits while children still hold its output
open (``server &``, a fork bomb); children that detached their output (``nohup cmd
>log 2>&1 &``) outlive the command, until `reset` or `close`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import docker.utils
import requests
from docker.types import DriverConfig, Mount

from megaflow.errors import SandboxClosedError, SandboxError, SandboxNotFoundError
from megaflow.sandbox._docker_io import (
    KILL_SCRIPT,
    Capture,
    FrameReader,
    Marked,
    SeedCache,
    file_tar,
    read_single_file,
)
from megaflow.sandbox.base import MODEL_SOCKET_MOUNT, ExecResult, SandboxConfig
from megaflow.sandbox.images import AGENT_UID

logger = logging.getLogger(__name__)

#: Label on every container (and volume) this backend makes; the reaper filters on it.
LABEL = "megaflow"
_USER = f"{AGENT_UID}:{AGENT_UID}"
_EXEC_ENV = "MEGAFLOW_EXEC_ID"
_KEEPALIVE = ["sleep", "2147483647"]
_MODE_DIR = 1 << 31  # Go's os.ModeDir, as the engine reports modes
#: After the kill, how long the output of a timed-out command may still drain.
_DRAIN_S = 1.0
#: When to first ask the engine whether a command whose output is still open has
#: exited, and how often after that (only long commands pay for these calls).
_POLL_FIRST_S = 0.2
_POLL_S = 0.5
#: How long to keep trying to start the killer while a fork bomb holds every pid.
_KILLER_RETRY_S = 10.0
#: Connections the default client keeps per engine: one per env-pool thread and more.
_POOL_CONNECTIONS = 32
#: The sandboxes' /etc/hosts: what the engine writes for ``--network none``.
HOSTS = (
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)
#: Named volume (on the engine) holding that file, and the file's name in it: a new
#: content takes a new name, so a file once in place is never rewritten.
ETC_VOLUME = "megaflow-etc"
_HOSTS_NAME = "hosts-v1"
#: After failing to provide that file, how long to do without it before trying again.
_HOSTS_RETRY_S = 300.0
#: A deferred seed's states (`DockerSandbox`): still to copy, being extracted by an
#: exec in flight, in place (or never needed).
_PENDING, _FILLING, _DONE = "pending", "filling", "done"
#: Printed on stderr by `_SEED_SCRIPT` once the work directory is filled, before the
#: command starts: nothing the command writes can come ahead of it.
_SEED_MARK = b"megaflow:seeded\n"
#: `_SEED_SCRIPT`'s exit status when extracting failed (the command never ran).
_SEED_FAILED = 213
# Run by `sh` (lighter than bash) for the first command of a handle whose seed is
# pending, with the tar on stdin: $1 the work directory, $2 the command. As the agent
# user, tar gives every file that user as owner (--no-same-owner), and keeps the
# tar's modes (-p, no umask) and times: what put_archive leaves. tar's own complaints
# are kept out of the command's stderr. Then stdin is dropped (the command must not
# read the seed's leftovers) and the shell becomes ``bash -lc CMD``, the process a
# plain exec starts, with the same environment, working directory and exec id.
_SEED_SCRIPT = (
    'if ! err=$(tar -x -p --no-same-owner -f - -C "$1" 2>&1); then '
    f'printf "megaflow: extracting the seed failed: %s\\n" "$err" >&2; exit {_SEED_FAILED}; fi; '
    f'printf "{_SEED_MARK.decode().rstrip()}\\n" >&2; exec 0</dev/null; exec bash -lc "$2"'
)
# Writes the file under a temporary name and renames it: a sandbox starting meanwhile
# in another process bind-mounts either no file yet or a complete one.
_HOSTS_WRITER = 'f=/v/$1; [ -s "$f" ] || { printf "%s" "$2" > "$f.$$" && chmod 0444 "$f.$$" && mv -f "$f.$$" "$f"; }'


class DockerBackend:
    """Creates locked-down Docker containers as sandboxes and finds them again.

    Args:
        client: Docker client to use; default ``docker.from_env()`` (``$DOCKER_HOST``),
            made on first use.
        seed_dir: Cache of work-directory snapshots, one tar per (image, workdir);
            default a directory under the system temp dir.
    """

    name = "docker"

    def __init__(self, client: docker.DockerClient | None = None, *, seed_dir: str | Path | None = None):
        self._client = client
        self._seeds = SeedCache(seed_dir, AGENT_UID)
        self._ncpu: int | None = None
        self._hosts = EtcHosts()

    @property
    def api(self) -> docker.APIClient:
        """The low-level API client (creating the client on first use)."""
        if self._client is None:
            with _translated("docker engine"):
                self._client = docker.from_env(max_pool_size=_POOL_CONNECTIONS)
        return self._client.api

    def create(self, config: SandboxConfig, labels: dict[str, str], *, defer_seed: bool = False) -> DockerSandbox:
        """Create and start a container; its work directory holds the image's content.

        With `defer_seed`, that content is not copied in here: the first `exec` on the
        returned handle streams it in, in the same engine round trip as its command
        (one ``put_archive`` saved; the image needs ``sh`` and GNU ``tar``), and any
        other first operation copies it the old way. Only this handle knows the
        content is pending: call `DockerSandbox.settle` (or any operation) before
        another process attaches the sandbox (`attach`), or that one sees an empty work
        directory.

        Raises:
            SandboxError: the image is missing (build it with `images.build_base`) or
                the engine failed.
        """
        if config.model_socket_dir:  # bound into the sandbox before the proxy's first socket is there
            os.makedirs(config.model_socket_dir, mode=0o755, exist_ok=True)
        api = self.api
        with _translated(config.image):
            try:
                image_id = api.inspect_image(config.image)["Id"]
            except docker.errors.ImageNotFound as exc:
                # Never pull: sandboxes run only images built on this host.
                raise SandboxError(f"image {config.image!r} not found; build it first") from exc
            if self._ncpu is None:
                self._ncpu = int(api.info()["NCPU"])
        hosts = None if config.network else self._hosts.source(api, image_id)
        for attempt in range(3):
            try:
                container_id = self._create_and_start(api, image_id, config, labels, hosts)
                break
            except SandboxError as exc:
                if hosts is None or hosts not in str(exc) or attempt == 2:
                    raise
                # The engine could not mount the file: gone (its volume was pruned), so
                # write it again; failing again, do without it (`--network none`).
                hosts = self._hosts.mount_failed(api, image_id, hosts, str(exc), give_up=attempt > 0)
        try:
            seed = self._seeds.get(api, image_id, config.workdir)
            sandbox = DockerSandbox(self, container_id, config, seed, seed_pending=defer_seed)
            if not defer_seed:
                sandbox.restore_snapshot()
        except BaseException:
            self.destroy(container_id)
            raise
        logger.debug("created sandbox %s from %s", container_id[:12], config.image)
        return sandbox

    def _create_and_start(
        self, api: docker.APIClient, image_id: str, config: SandboxConfig, labels: dict[str, str], hosts: str | None
    ) -> str:
        """Create and start the container; with `hosts`, the engine's networking is off."""
        host_config = _host_config(config, self._ncpu or 1)
        if hosts is not None:
            host_config["mounts"] = [*host_config["mounts"], Mount("/etc/hosts", hosts, type="bind", read_only=True)]
        with _translated(config.image):
            container_id = api.create_container(
                image_id,
                entrypoint=_KEEPALIVE[:1],
                command=_KEEPALIVE[1:],
                user=_USER,
                environment={"HOME": config.workdir, **config.env},
                working_dir=config.workdir,
                labels={**labels, LABEL: "1"},
                # With the engine's networking off, runc gives the container a network
                # namespace of its own, loopback only: `--network none` minus libnetwork.
                network_disabled=hosts is not None,
                host_config=api.create_host_config(**host_config),
            )["Id"]
        try:
            with _translated(container_id):
                api.start(container_id)
        except BaseException:
            self.destroy(container_id)
            raise
        return container_id

    def attach(self, sandbox_id: str, config: SandboxConfig) -> DockerSandbox:
        """Reopen a running sandbox by id (from any process talking to the same engine).

        The handle assumes the work directory is filled: a sandbox created with
        ``defer_seed`` must have been settled by its creator first.

        Raises:
            SandboxNotFoundError: no such container, not ours, or no longer running.
        """
        with _translated(sandbox_id):
            info = self.api.inspect_container(sandbox_id)
        if (info["Config"].get("Labels") or {}).get(LABEL) != "1":
            raise SandboxNotFoundError(f"container {sandbox_id[:12]} is not a megaflow sandbox")
        if not info["State"]["Running"]:
            raise SandboxNotFoundError(f"sandbox {sandbox_id[:12]} is not running any more")
        return DockerSandbox(self, info["Id"], config, self._seeds.get(self.api, info["Image"], config.workdir))

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of this backend's containers carrying all `labels`, stopped ones included."""
        filters = {"label": [f"{LABEL}=1", *(f"{k}={v}" for k, v in labels.items())]}
        with _translated("docker engine"):
            return [c["Id"] for c in self.api.containers(all=True, filters=filters)]

    def destroy(self, sandbox_id: str) -> None:
        """Remove a container and its volumes. Idempotent."""
        try:
            self.api.remove_container(sandbox_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a removal is already in progress
                raise SandboxError(f"removing sandbox {sandbox_id[:12]} failed: {exc}") from exc
        except requests.RequestException as exc:
            raise SandboxError(f"removing sandbox {sandbox_id[:12]} failed: {exc}") from exc


class EtcHosts:
    """The ``/etc/hosts`` file sandboxes bind-mount, as a path on the engine's host.

    Kept in a named volume (`ETC_VOLUME`), so it exists wherever the engine runs
    (a remote engine, or an env worker that reaches the host's engine from inside a
    container) and the client's file system plays no part. Written once per volume,
    by a short-lived locked-down container, and checked once per backend. Nothing
    refers to the volume by name, so ``docker volume prune --all`` (or a plain
    ``prune`` before Docker 23) removes it: running sandboxes then lose ``localhost``
    from ``/etc/hosts``; the next create writes the file again.

    Args:
        volume: Name of the volume.
    """

    def __init__(self, volume: str = ETC_VOLUME) -> None:
        self.volume = volume
        self._lock = threading.Lock()
        self._path: str | None = None
        self._failed_at: float | None = None

    def source(self, api: docker.APIClient, image_id: str) -> str | None:
        """The file's path on the engine's host; None when it cannot be provided."""
        with self._lock:
            failed_recently = self._failed_at is not None and time.monotonic() - self._failed_at < _HOSTS_RETRY_S
            if self._path is None and not failed_recently:
                try:
                    self._path = self._provide(api, image_id)
                    self._failed_at = None
                except (docker.errors.DockerException, requests.RequestException, SandboxError) as exc:
                    self._give_up(str(exc))
            return self._path

    def mount_failed(self, api: docker.APIClient, image_id: str, path: str, why: str, give_up: bool) -> str | None:
        """The engine could not mount `path`: write the file again, or (`give_up`) do without it."""
        with self._lock:
            if self._path == path:
                self._path = None
                if give_up:
                    self._give_up(why)
        return self.source(api, image_id)

    def _give_up(self, why: str) -> None:
        logger.warning("no shared /etc/hosts (%s); sandboxes use --network none (slower creates)", why)
        self._path, self._failed_at = None, time.monotonic()

    def _provide(self, api: docker.APIClient, image_id: str) -> str:
        volume = api.create_volume(self.volume, labels={LABEL: "1"})  # returns the volume if it exists
        writer = api.create_container(
            image_id,
            entrypoint=["sh", "-c", _HOSTS_WRITER, "megaflow-hosts"],
            command=[_HOSTS_NAME, HOSTS],
            user="0:0",
            network_disabled=True,
            labels={LABEL + ".helper": "hosts"},
            host_config=api.create_host_config(
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                mounts=[Mount("/v", self.volume, type="volume")],
                mem_limit="64m",
                pids_limit=16,
            ),
        )["Id"]
        try:
            api.start(writer)
            code = api.wait(writer, timeout=60)["StatusCode"]
            if code != 0:
                logs = api.logs(writer).decode(errors="replace")[-300:]
                raise SandboxError(f"writing /etc/hosts into volume {self.volume} failed ({code}): {logs}")
        finally:
            api.remove_container(writer, force=True)
        return posixpath.join(volume["Mountpoint"], _HOSTS_NAME)


class DockerSandbox:
    """One running container; see `megaflow.sandbox.base.Sandbox` for the contract.

    Args:
        seed: The work directory's initial content (a tar), None when empty.
        seed_pending: The seed is not in the container yet (`DockerBackend.create`'s
            ``defer_seed``): the first `exec` streams it in, any other operation
            puts it first. Several threads may share a handle: a lock-guarded state
            makes exactly one of them fill the directory, and the others wait for it.
    """

    def __init__(self, backend: DockerBackend, container_id: str, config: SandboxConfig, seed: Path | None,
                 *, seed_pending: bool = False):
        self.id = container_id
        self._backend = backend
        self._api = backend.api
        self._config = config
        self._seed = seed
        self._closed = False
        self._seed_state = _PENDING if seed is not None and seed_pending else _DONE
        # Reentrant (Condition's default): `settle` puts the seed through `restore_snapshot`.
        self._seed_cond = threading.Condition()

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Run `cmd` with ``bash -lc`` in the work directory; see the module docstring.

        On a handle whose seed is pending, the same exec first extracts the seed
        streamed on its stdin (its time counts towards `timeout` and ``duration_s``).

        Raises:
            SandboxError: that extraction failed (the command did not run; the seed
                stays pending, so the next operation puts it the old way).
        """
        self._check_open()
        token = uuid.uuid4().hex
        started = time.monotonic()
        seeding = self._claim_seed()
        out, err = Capture(self._config.max_output_bytes), Capture(self._config.max_output_bytes)
        marked = Marked(err, _SEED_MARK, self._seeded) if seeding else None
        try:
            with _translated(self.id), contextlib.ExitStack() as stack:
                # Opened first: a seed gone from the cache fails before any exec starts.
                seed = stack.enter_context(open(self._seed, "rb")) if seeding and self._seed else None
                exec_id = self._api.exec_create(
                    self.id,
                    ["sh", "-c", _SEED_SCRIPT, "megaflow-seed", self._config.workdir, cmd] if seeding
                    else ["bash", "-lc", cmd],
                    environment={_EXEC_ENV: token},
                    workdir=self._config.workdir,
                    user=_USER,
                    stdin=seeding,
                )["Id"]
                with FrameReader(self._api.exec_start(exec_id, socket=True), {1: out, 2: marked or err}) as reader:
                    if seed is not None:
                        # All of it before reading: the script writes nothing until tar
                        # has read to the end, so the two directions cannot block each other.
                        reader.send(seed, started + timeout)
                    exit_code, timed_out, note = self._wait(exec_id, token, reader, started, timeout)
        finally:
            if seeding:
                self._unclaim_seed()
        stdout, cut_out = out.text()
        stderr, cut_err = err.text()
        if marked is not None and not marked.seen:
            what = "timed out" if timed_out else f"exit {exit_code}"
            raise SandboxError(f"filling the work directory failed in sandbox {self.id[:12]} ({what}): "
                               f"{(stderr + note).strip()[-500:] or stdout.strip()[-500:]}")
        return ExecResult(
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr + note,
            timed_out=timed_out,
            truncated=cut_out or cut_err,
            duration_s=time.monotonic() - started,
        )

    def spawn(self, cmd: str, timeout: float) -> None:
        """Start `cmd` (``bash -lc``) in the background and return at once (CLI agents).

        A detached exec: it dies with the container (`destroy`); `timeout` is the
        caller's to enforce (the episode's deadline), as the engine has no limit for it.
        """
        self._check_open()
        self.settle()
        with _translated(self.id):
            exec_id = self._api.exec_create(self.id, ["bash", "-lc", cmd], workdir=self._config.workdir,
                                            user=_USER)["Id"]
            self._api.exec_start(exec_id, detach=True)

    def _wait(
        self, exec_id: str, token: str, reader: FrameReader, started: float, timeout: float
    ) -> tuple[int, bool, str]:
        """Read output until the command ends; returns (exit code, timed out, note)."""
        deadline = started + timeout
        poll_at = time.monotonic() + _POLL_FIRST_S
        while not reader.read_until(min(deadline, poll_at)):
            state = self._api.exec_inspect(exec_id)
            if state["Running"] and time.monotonic() < deadline:
                poll_at = time.monotonic() + _POLL_S
                continue
            # The deadline passed, or the command exited while children still hold
            # its output (a fork bomb, `server &`): they go, as a timed-out tree does.
            note = self._kill_tree(token, started)
            reader.read_until(time.monotonic() + _DRAIN_S)
            if state["Running"]:
                return 124, True, note
            return self._exit_code(exec_id), False, note
        return self._exit_code(exec_id), False, ""

    def write_file(self, path: str, data: bytes) -> None:
        """Write `data` to `path`, creating parent directories, owned by the agent user.

        Raises:
            PermissionError: `path` leaves the work directory (``..``, an absolute
                path elsewhere, a symlink pointing out, a read-only location).
            IsADirectoryError: `path` is a directory.
        """
        self._check_open()
        full = self._resolve(path)
        self.settle()
        with _translated(self.id):
            stat = self._stat(full)
            if stat and stat.get("linkTarget"):
                full = self._inside(stat["linkTarget"], path)
                stat = self._stat(full)
            if stat and stat["mode"] & _MODE_DIR:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            parent, name = posixpath.split(full)
            # An overwrite keeps the file's permissions, as writing in place would.
            archive = file_tar(name, data, AGENT_UID, stat["mode"] & 0o777 if stat else 0o644)
            try:
                self._put_archive(parent, archive, path)
            except docker.errors.NotFound as exc:
                if _container_missing(exc):
                    raise
                self._run_script(["mkdir", "-p", "--", parent], path_error=path)
                self._put_archive(parent, archive, path)

    def read_file(self, path: str) -> bytes:
        """Read `path` (symlinks inside the work directory are followed).

        Raises:
            FileNotFoundError: no such file.
            IsADirectoryError: `path` is a directory.
            PermissionError: `path` leaves the work directory.
        """
        self._check_open()
        full = self._resolve(path)
        self.settle()
        with _translated(self.id):
            for _ in range(2):  # the engine reports a link's target fully resolved: one hop
                try:
                    chunks, stat = self._api.get_archive(self.id, full)
                except docker.errors.NotFound as exc:
                    if _container_missing(exc):
                        raise
                    raise FileNotFoundError(errno.ENOENT, "no such file in the sandbox", path) from exc
                if stat["mode"] & _MODE_DIR:
                    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
                if not stat.get("linkTarget"):
                    return read_single_file(chunks)
                for _chunk in chunks:  # drain, so the connection can be reused
                    pass
                full = self._inside(stat["linkTarget"], path)
        raise OSError(errno.ELOOP, "too many levels of symbolic links", path)

    def reset(self) -> None:
        """Kill every process but init, empty the writable directories, restore the snapshot.

        Takes one exec (plus one archive upload when the image put files in the work
        directory). A container that stopped, or whose processes cannot be killed, is
        restarted instead. A pending seed needs nothing more: the restore puts it.
        """
        self._check_open()
        dirs = sorted({self._config.workdir, "/tmp", "/dev/shm"})
        try:
            self._run_script(["bash", "-c", KILL_SCRIPT, "megaflow-kill", "all", "-", "-", *dirs])
        except SandboxNotFoundError:
            raise
        except SandboxError as exc:
            logger.warning("sandbox %s: reset by restart (%s)", self.id[:12], exc)
            self._restart()
        self.restore_snapshot()

    def alive(self) -> bool:
        """Whether the container is running: a cheap probe for warm pools (no exec)."""
        try:
            return bool(self._api.inspect_container(self.id)["State"]["Running"])
        except docker.errors.NotFound:
            return False

    def close(self) -> None:
        """Remove the container and its volumes. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.destroy(self.id)

    def restore_snapshot(self) -> None:
        """Put the work directory's initial content (taken from the image) back."""
        if self._seed is not None:
            with _translated(self.id), open(self._seed, "rb") as fh:
                self._api.put_archive(self.id, self._config.workdir, fh)
        with self._seed_cond:
            self._seed_state = _DONE
            self._seed_cond.notify_all()

    def settle(self) -> None:
        """Copy a pending seed (``create(..., defer_seed=True)``) in now; a no-op otherwise.

        `write_file`, `read_file` and `spawn` do this first (`reset` and `exec` fill
        the directory their own way). Call it before another handle or process
        attaches the sandbox (`DockerBackend.attach`): only this handle knows the work
        directory is still to fill. Waits while another thread's first `exec` is
        extracting the seed.
        """
        self._check_open()
        with self._seed_cond:
            while self._seed_state == _FILLING:
                self._seed_cond.wait()
            if self._seed_state == _PENDING:
                self.restore_snapshot()

    def _claim_seed(self) -> bool:
        """Whether this exec is the one to stream the pending seed in (it now fills)."""
        with self._seed_cond:
            while self._seed_state == _FILLING:  # another thread's first exec: wait for its tar
                self._seed_cond.wait()
            if self._seed_state == _PENDING:
                self._seed_state = _FILLING
                return True
            return False

    def _seeded(self) -> None:
        """The seeding exec's tar has finished (its marker came): the directory is filled."""
        with self._seed_cond:
            if self._seed_state == _FILLING:
                self._seed_state = _DONE
                self._seed_cond.notify_all()

    def _unclaim_seed(self) -> None:
        """The seeding exec ended; without its marker the seed is pending again."""
        with self._seed_cond:
            if self._seed_state == _FILLING:
                self._seed_state = _PENDING
                self._seed_cond.notify_all()

    def _kill_tree(self, token: str, started: float) -> str:
        """Kill the processes of one exec; returns a note for stderr when that took a restart."""
        # Slack (0.1 s) errs towards counting a process started just before as ours.
        window_cs = str(int((time.monotonic() - started) * 100) + 10)
        cmd = ["bash", "-c", KILL_SCRIPT, "megaflow-kill", "tok", token, window_cs]
        try:
            self._run_script(cmd, retry_s=_KILLER_RETRY_S)
            return ""
        except SandboxNotFoundError:
            raise
        except SandboxError as exc:
            logger.warning("sandbox %s: killer failed (%s); restarting it", self.id[:12], exc)
            self._restart()
            self.restore_snapshot()
            return "\n[megaflow: the process tree could not be killed; the sandbox was restarted and reset]\n"

    def _run_script(self, cmd: list[str], retry_s: float = 2.0, path_error: str | None = None) -> None:
        """Run a helper command as the agent user, retrying while it cannot start."""
        deadline = time.monotonic() + retry_s
        while True:
            with _translated(self.id):
                exec_id = self._api.exec_create(self.id, cmd, user=_USER, environment={_EXEC_ENV: "helper"})["Id"]
                output = self._api.exec_start(exec_id).decode(errors="replace")
                code = self._exit_code(exec_id)
            if code == 0:
                return
            if path_error is not None:
                raise PermissionError(errno.EACCES, output.strip() or "cannot create directory", path_error)
            if time.monotonic() > deadline:
                raise SandboxError(f"helper {cmd[0]} failed in sandbox {self.id[:12]} ({code}): {output[-500:]}")
            time.sleep(0.1)

    def _exit_code(self, exec_id: str) -> int:
        # The stream can end a moment before the engine records the exit.
        for _ in range(400):
            state = self._api.exec_inspect(exec_id)
            if not state["Running"] and state["ExitCode"] is not None:
                return int(state["ExitCode"])
            time.sleep(0.005)
        raise SandboxError(f"exec {exec_id[:12]} in sandbox {self.id[:12]} did not report an exit code")

    def _restart(self) -> None:
        with _translated(self.id):
            self._api.restart(self.id, timeout=0)

    def _resolve(self, path: str) -> str:
        return self._inside(posixpath.join(self._config.workdir, path), path)

    def _inside(self, target: str, path: str) -> str:
        """Normalise `target`; refuse it unless it lies in the work directory."""
        full = posixpath.normpath(target)
        root = self._config.workdir.rstrip("/")
        if full != root and not full.startswith(root + "/"):
            raise PermissionError(errno.EACCES, "path leaves the work directory", path)
        return full

    def _stat(self, full: str) -> dict[str, Any] | None:
        """The engine's stat of `full` (symlinks not followed), None when missing."""
        # The SDK has no call for HEAD /archive, the request that stats a path.
        res = self._api.head(self._api._url("/containers/{0}/archive", self.id), params={"path": full})
        if res.status_code == 404:
            return None  # a missing container shows up on the next, non-HEAD request
        self._api._raise_for_status(res)
        return docker.utils.decode_json_header(res.headers["X-Docker-Container-Path-Stat"])

    def _put_archive(self, parent: str, archive: bytes, path: str) -> None:
        try:
            self._api.put_archive(self.id, parent, archive)
        except docker.errors.APIError as exc:
            # Outside the work-directory volume the engine refuses archive writes as
            # the root file system is read-only: the confinement, seen from here.
            if "read-only" in str(exc):
                raise PermissionError(errno.EROFS, "only the work directory is writable", path) from exc
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id[:12]} is closed")


def _host_config(config: SandboxConfig, ncpu: int) -> dict[str, object]:
    """The isolation settings: everything off unless the config turns it on."""
    # Tmpfs pages are charged to the memory limit and cannot be swapped out; caps
    # keep a full disk from leaving no memory to run even `rm`.
    mb = config.memory_mb
    tmpfs = {} if config.workdir == "/tmp" else {"/tmp": f"rw,exec,nosuid,nodev,mode=1777,size={mb // 4}m"}
    return {
        "init": True,
        "network_mode": None if config.network else "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "mounts": [_tmpfs_volume(config.workdir, f"uid={AGENT_UID},gid={AGENT_UID},mode=0755,size={mb // 2}m")]
        + ([Mount(MODEL_SOCKET_MOUNT, config.model_socket_dir, type="bind", read_only=True)]
           if config.model_socket_dir else []),  # a CLI agent's model proxy (megaflow.hops.cli_proxy)
        "tmpfs": tmpfs,
        "shm_size": f"{max(1, min(64, mb // 8))}m",
        "mem_limit": f"{mb}m",
        "memswap_limit": f"{mb}m",  # equal: no swap beyond the limit
        "pids_limit": config.pids,
        # The engine refuses more CPUs than the host has.
        "nano_cpus": int(min(config.cpus, ncpu) * 1e9),
    }


def _tmpfs_volume(target: str, options: str) -> Mount:
    # An anonymous volume of the local driver backed by tmpfs: removed with the
    # container (remove v=True), and visible to put_archive/get_archive.
    driver = DriverConfig("local", {"type": "tmpfs", "device": "tmpfs", "o": f"{options},nosuid,nodev"})
    return Mount(target=target, source=None, type="volume", driver_config=driver, labels={LABEL: "1"})


def _container_missing(exc: docker.errors.NotFound) -> bool:
    return "no such container" in str(exc).lower()


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn engine failures into the sandbox error contract."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise SandboxNotFoundError(f"{what[:12]}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"{what[:12]}: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise SandboxError(f"docker engine failed ({what[:12]}): {exc}") from exc
