"""Helpers sandbox backends share: where a path lands, and how a command's output is read and capped."""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import selectors
import signal
import subprocess
import time

from megaflow.sandbox.base import TRUNCATION_MARKER, ExecResult

logger = logging.getLogger(__name__)

#: How long pipes may stay open after the kill before they are abandoned.
KILL_GRACE_S = 5.0


def workdir_relpath(workdir: str, path: str) -> str | None:
    """Map a sandbox path to a path relative to the work directory.

    Args:
        workdir: The sandbox's work directory (absolute).
        path: Relative (to the work directory) or absolute.

    Returns:
        The normalised relative path ("." for the work directory itself), or None for
        an absolute path outside the work directory.

    Raises:
        PermissionError: a relative path climbs out with "..".
        ValueError: the path is empty.
    """
    if not path:
        raise ValueError("empty path")
    if posixpath.isabs(path):
        norm = "/" + posixpath.normpath(path).lstrip("/")
        root = "/" + posixpath.normpath(workdir).strip("/")
        if norm == root:
            return "."
        return norm[len(root) :].lstrip("/") if norm.startswith(root.rstrip("/") + "/") else None
    rel = posixpath.normpath(path)
    if rel == ".." or rel.startswith("../"):
        raise PermissionError(errno.EACCES, "path escapes the work directory", path)
    return rel


class OutputCap:
    """Keeps the head and the tail of a stream, at most `limit` bytes in all."""

    def __init__(self, limit: int):
        self._head_cap = limit // 2
        self._tail_cap = limit - self._head_cap
        self.head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream."""
        self.total += len(chunk)
        room = self._head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            if len(self._tail) > self._tail_cap:
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        """True when some of the stream was dropped."""
        return self.total > len(self.head) + len(self._tail)

    def data(self) -> bytes:
        """The kept bytes (the whole stream unless `truncated`)."""
        return bytes(self.head + self._tail)

    def text(self) -> str:
        """The kept output as text, with the marker where bytes were dropped."""
        if not self.truncated:
            return self.data().decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self._tail)
        return (
            self.head.decode("utf-8", "replace")
            + TRUNCATION_MARKER.format(omitted=omitted)
            + self._tail.decode("utf-8", "replace")
        )


def pump(proc: subprocess.Popen, out: OutputCap, err: OutputCap, deadline: float) -> bool:
    """Read a process's stdout and stderr until both close, killing it at the deadline.

    Both pipes are drained together, so no amount of output can block the process,
    and only what `out` and `err` keep stays in memory.

    Args:
        proc: Started with both pipes and ``start_new_session=True``.
        out: Receives stdout.
        err: Receives stderr.
        deadline: `time.monotonic` value at which the process group is killed.

    Returns:
        True when the deadline passed and the process group was killed.
    """
    timed_out = False
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    logger.warning("sandbox pipes still open %.0fs after the kill", KILL_GRACE_S)
                    break
                timed_out = True
                kill_group(proc)
                deadline = time.monotonic() + KILL_GRACE_S
                continue
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.feed(chunk)
                else:
                    selector.unregister(key.fileobj)
    if not timed_out:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
    return timed_out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads; a no-op once it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def exec_result(code: int, out: OutputCap, err: OutputCap, timed_out: bool, started: float) -> ExecResult:
    """The ExecResult of a finished command whose streams went through `OutputCap`s."""
    return ExecResult(
        exit_code=code,
        stdout=out.text(),
        stderr=err.text(),
        timed_out=timed_out,
        truncated=out.truncated or err.truncated,
        duration_s=time.monotonic() - started,
    )
