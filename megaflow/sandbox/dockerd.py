"""Find a Docker engine, or start Debian's `dockerd` privately when none answers.

Sandboxes need a Docker engine. On a developer box or an env host one usually runs
already (``$DOCKER_HOST`` or the default socket); in CI and in bare VMs it may not,
so `ensure_dockerd` starts one with its own socket, data root and log under a
directory the caller owns. The daemon runs without iptables and without the default
bridge: sandboxes run with ``--network none``, and a daemon that touches the host's
firewall is not something a test fixture should do. ``docker/start-dockerd.sh`` does
the same from a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import docker.errors
import requests

from megaflow.errors import SandboxError

logger = logging.getLogger(__name__)

#: Where a system-wide daemon listens when nothing else is configured.
DEFAULT_SOCKET = "unix:///var/run/docker.sock"

# AF_UNIX paths are limited to 108 bytes; dockerd also puts containerd's socket
# under the exec root, so both must stay short.
_MAX_SOCKET_PATH = 100


def daemon_answers(url: str, timeout: float = 3.0) -> bool:
    """Return True when a Docker engine answers a ping at `url`."""
    if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
        return False
    client = docker.DockerClient(base_url=url, timeout=timeout)
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, requests.RequestException, OSError):
        return False
    finally:
        client.close()


def ensure_dockerd(data_dir: str | os.PathLike[str], timeout: float = 60.0) -> str:
    """Return a DOCKER_HOST url of a Docker engine that answers, starting one if needed.

    Tries ``$DOCKER_HOST``, then the default socket, then a daemon this function
    started earlier under `data_dir`. If none answers, starts ``dockerd`` in the
    background (it outlives the caller, like any daemon) with its socket, data root,
    exec root, pid file and log under `data_dir`, and waits until it answers.
    Concurrent callers are serialised by a lock file, so only one daemon starts.

    Args:
        data_dir: Directory for the private daemon's state (images persist there,
            which is what makes image builds cacheable between runs).
        timeout: Seconds to wait for a started daemon to answer.

    Returns:
        A url for ``DOCKER_HOST`` / ``docker.DockerClient(base_url=...)``.

    Raises:
        SandboxError: no daemon answers and none could be started (not root, no
            ``dockerd`` binary, or it failed; the message names the log file).
    """
    candidates = [os.environ.get("DOCKER_HOST", ""), DEFAULT_SOCKET]
    for url in candidates:
        if url and daemon_answers(url):
            logger.debug("using running docker engine at %s", url)
            return url

    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    url = f"unix://{root / 'docker.sock'}"
    with _locked(root / "start.lock"):
        # Another process may have started it while we waited for the lock.
        if daemon_answers(url):
            return url
        pid = _start(root)
        _wait(url, pid, root / "dockerd.log", timeout)
    logger.info("started dockerd (pid %d) at %s", pid, url)
    return url


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start(root: Path) -> int:
    binary = shutil.which("dockerd")
    if binary is None:
        raise SandboxError("no docker engine answers and no `dockerd` binary is installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise SandboxError(
            "no docker engine answers and starting dockerd needs root; set DOCKER_HOST to a running engine"
        )
    exec_root = root / "exec"
    longest = exec_root / "containerd" / "containerd.sock"
    if len(str(longest)) > _MAX_SOCKET_PATH:
        raise SandboxError(f"data_dir {root} is too long for unix socket paths; use a shorter directory")
    cmd = [
        binary,
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--host=unix://{root / 'docker.sock'}",
        f"--data-root={root / 'data'}",
        f"--exec-root={exec_root}",
        f"--pidfile={root / 'dockerd.pid'}",
    ]
    # `sh` backgrounds the daemon and exits at once: dockerd is re-parented to init,
    # so it survives the caller and leaves no child behind for it to reap.
    launcher = '"$@" >>"$MF_LOG" 2>&1 </dev/null & echo $!'
    out = subprocess.run(
        ["sh", "-c", launcher, "sh", *cmd],
        env={**os.environ, "MF_LOG": str(root / "dockerd.log")},
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    return int(out.stdout.strip())


def _wait(url: str, pid: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_answers(url, timeout=1.0):
            return
        if not _alive(pid):
            raise SandboxError(f"dockerd (pid {pid}) exited; see {log}:\n{_tail(log)}")
        time.sleep(0.2)
    raise SandboxError(f"dockerd did not answer at {url} within {timeout:.0f}s; see {log}:\n{_tail(log)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
