"""Plumbing for the Docker backend: the kill script, output capture, stream demux, tars.

Kept apart from `megaflow.sandbox.docker` so that module stays about lifecycle and
isolation; nothing here talks to Docker beyond reading a socket or a chunk iterator.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import docker.errors

from megaflow.sandbox.base import TRUNCATION_MARKER

#: Run in the container by the Docker backend to end processes. Bash builtins only,
#: so that it needs a single pid even under a fork bomb. ``tok ID CS`` kills the
#: processes carrying ``MEGAFLOW_EXEC_ID=ID``, everything in their sessions, and
#: processes with no such variable at all (an environment cleared with ``env -i``)
#: started in the last CS centiseconds; ``all - -`` kills everything. Both spare
#: init, the keep-alive (the oldest child of init) and the script itself, and repeat
#: until a round finds nothing. Further arguments are directories to empty. Start
#: times are clock ticks, which Linux reports at 100 per second whatever its HZ.
KILL_SCRIPT = r"""
exec 2>/dev/null
mode=$1 want="MEGAFLOW_EXEC_ID=$2" since=-1; shift 2
if [[ $mode == tok ]]; then read -r up _ < /proc/uptime; up=${up/./}; since=$(( 10#$up - $1 )); fi
shift; dirs=("$@"); self=$$ keep=-1 oldest=
for d in /proc/[0-9]*; do
  read -r st < "$d/stat" || continue; f=(${st##*) })
  if [[ ${f[1]} == 1 ]] && { [[ -z $oldest ]] || (( f[19] < oldest )); }; then oldest=${f[19]} keep=${d#/proc/}; fi
done
# Found first, stopped, then killed: killed one by one, a shell whose child died first
# runs its next command (`sleep 60; echo never` printed "never") before its own turn.
end() { (( $# )) || return 1; kill -STOP "$@"; kill -9 "$@"; return 0; }
for ((round = 1; round <= 200; round++)); do
  hit=0 sids=" " found=()
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [[ $p == "$self" || $p == 1 || $p == "$keep" ]] && continue
    read -r st < "$d/stat" || continue; f=(${st##*) })
    [[ ${f[0]} == Z ]] && continue
    if [[ $mode == all ]]; then found+=("$p"); continue; fi
    mine=0 other=0
    while IFS= read -r -d '' kv; do
      case $kv in "$want") mine=1; break ;; MEGAFLOW_EXEC_ID=*) other=1; break ;; esac
    done < "$d/environ"
    if (( mine || (!other && f[19] >= since) )); then
      found+=("$p"); (( f[3] > 1 )) && sids+="${f[3]} "
    fi
  done
  if [[ $sids != " " ]]; then
    for d in /proc/[0-9]*; do
      p=${d#/proc/}; [[ $p == "$self" || $p == 1 || $p == "$keep" ]] && continue
      read -r st < "$d/stat" || continue; f=(${st##*) })
      [[ ${f[0]} != Z && $sids == *" ${f[3]} "* ]] && found+=("$p")
    done
  fi
  end "${found[@]}" && hit=1
  (( hit )) || break
done
shopt -s dotglob nullglob
for dir in "${dirs[@]}"; do chmod -R u+rwX "$dir"/*; rm -rf -- "$dir"/*; done
echo "megaflow-ok rounds=$round"
"""


class Capture:
    """Keeps the first and last halves of `cap` bytes of a stream, counting the rest.

    Memory stays O(cap) however much the command prints.
    """

    def __init__(self, cap: int):
        self._head_cap = cap // 2
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Append a chunk of output."""
        self._total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if len(data):
            self._tail += data
            # Trim only when twice over, so trimming costs O(1) per byte overall.
            if len(self._tail) > 2 * self._tail_cap:
                del self._tail[: -self._tail_cap]

    def text(self) -> tuple[str, bool]:
        """Return (decoded output with the truncation marker if cut, whether it was cut)."""
        tail = bytes(self._tail[-self._tail_cap :]) if self._tail_cap else b""
        omitted = self._total - len(self._head) - len(tail)
        if omitted <= 0:
            return (bytes(self._head) + tail).decode(errors="replace"), False
        head = bytes(self._head).decode(errors="replace")
        return head + TRUNCATION_MARKER.format(omitted=omitted) + tail.decode(errors="replace"), True


class Marked:
    """Passes a stream on to `sink`, minus a leading `marker`; `seen` says whether it came.

    The deferred seed (`megaflow.sandbox.docker.DockerSandbox.exec`) prints the
    marker on stderr once the work directory is filled and before the command
    starts, so nothing the command writes can come first. `on_seen` runs (in the
    reading thread) as soon as the marker is complete.
    """

    def __init__(self, sink: Capture, marker: bytes, on_seen: Callable[[], None]):
        self._sink = sink
        self._marker = marker
        self._on_seen = on_seen
        self._head: bytearray | None = bytearray()  # None once decided
        self.seen = False

    def feed(self, data: bytes | memoryview) -> None:
        """Append a chunk of the stream."""
        if self._head is not None:
            take = len(self._marker) - len(self._head)
            self._head += data[:take]
            data = data[take:]
            if len(self._head) < len(self._marker) and self._marker.startswith(self._head):
                return
            head, self._head = bytes(self._head), None
            if head == self._marker:
                self.seen = True
                self._on_seen()
            else:
                self._sink.feed(head)
        if len(data):
            self._sink.feed(data)


class FrameReader:
    """Reads Docker's multiplexed exec stream from a hijacked socket, with deadlines.

    Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian length) and
    its payload; stream 1 is stdout and 2 stderr.

    Args:
        sock: What ``APIClient.exec_start(..., socket=True)`` returned.
        sinks: Capture (or `Marked`) per stream id.
    """

    def __init__(self, sock: Any, sinks: dict[int, Capture | Marked]):
        self._sock = sock
        self._raw: socket.socket = getattr(sock, "_sock", sock)
        self._sinks = sinks
        self._header = bytearray()
        self._left = 0
        self._sink: Capture | Marked | None = None
        self._eof = False

    def read_until(self, deadline: float) -> bool:
        """Read until the stream ends (True) or `deadline` (monotonic) passes (False)."""
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._raw.settimeout(remaining)
            try:
                chunk = self._raw.recv(1 << 16)
            except TimeoutError:
                return False
            except OSError:
                chunk = b""  # the engine dropped the connection: treat as the end
            if not chunk:
                self._eof = True
            else:
                self._feed(memoryview(chunk))
        return True

    def send(self, fh: BinaryIO, deadline: float) -> None:
        """Send `fh` to the command's stdin, then end that input (half-close).

        Needs an exec created with stdin attached. Gives up at `deadline` (monotonic)
        or when the engine stops taking input; neither raises: the command's end, or
        the deadline, shows up in `read_until`.
        """
        try:
            self._raw.settimeout(max(deadline - time.monotonic(), 0.001))
            self._raw.sendfile(fh)  # os.sendfile on a plain socket: no copy through Python
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self._raw.shutdown(socket.SHUT_WR)

    def _feed(self, view: memoryview) -> None:
        i, n = 0, len(view)
        while i < n:
            if self._left == 0:
                part = view[i : i + 8 - len(self._header)]
                self._header += part
                i += len(part)
                if len(self._header) == 8:
                    self._sink = self._sinks.get(self._header[0])
                    self._left = int.from_bytes(self._header[4:8], "big")
                    self._header.clear()
                continue
            take = min(self._left, n - i)
            if self._sink is not None:
                self._sink.feed(view[i : i + take])
            i += take
            self._left -= take

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        # Shut the socket down first (a child still writing cannot block us), then
        # close the HTTP response before the socket under it, or its finaliser fails.
        response = getattr(self._sock, "_response", None)
        closers = [lambda: self._raw.shutdown(socket.SHUT_RDWR), self._sock.close, self._raw.close]
        if response is not None:
            closers.insert(1, response.close)
        for closer in closers:
            with contextlib.suppress(OSError, ValueError):
                closer()


def file_tar(name: str, data: bytes, uid: int, mode: int = 0o644) -> bytes:
    """A tar archive holding one regular file `name` owned by `uid`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, uid, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_single_file(chunks: Iterable[bytes]) -> bytes:
    """The content of the first regular file in a streamed tar archive."""
    with tarfile.open(fileobj=_ChunkFile(chunks), mode="r|") as tar:
        for member in tar:
            if member.isreg():
                fh = tar.extractfile(member)
                return fh.read() if fh is not None else b""
    raise IsADirectoryError("the archive holds no regular file")


class SeedCache:
    """Snapshots of an image's work directory, as tars ready for ``put_archive``.

    A sandbox's work directory is a fresh tmpfs that hides whatever the image holds
    at that path, so the image's content is copied in at create time (or, deferred,
    streamed into the first command: `megaflow.sandbox.docker.DockerSandbox.exec`)
    and again at every reset. Files are re-owned by the agent user (task images are usually built
    as root). Keyed by image id, so entries never go stale and processes share them.

    Args:
        directory: Where the tars live; default ``$TMPDIR/megaflow-docker-seeds``.
        uid: Owner to give every file.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, uid: int):
        self._dir = Path(directory) if directory else Path(tempfile.gettempdir()) / "megaflow-docker-seeds"
        self._uid = uid

    def get(self, api: docker.APIClient, image_id: str, workdir: str) -> Path | None:
        """The snapshot tar for `workdir` in `image_id`, or None when it is empty."""
        key = hashlib.sha256(f"{image_id}\0{workdir}\0{self._uid}".encode()).hexdigest()[:32]
        path, empty = self._dir / f"{key}.tar", self._dir / f"{key}.empty"
        if empty.exists():
            return None
        if path.exists():
            return path
        self._dir.mkdir(parents=True, exist_ok=True)
        # A created, never started container exposes the image's files to the archive API.
        container = api.create_container(image_id, command=["true"], network_disabled=True)["Id"]
        tmp = self._dir / f"{key}.{os.getpid()}.tmp"
        try:
            try:
                chunks, _ = api.get_archive(container, workdir)
            except docker.errors.NotFound:
                count = 0
            else:
                with open(tmp, "wb") as out:
                    count = self._rebase(chunks, out)
        finally:
            api.remove_container(container, force=True)
        if count == 0:
            tmp.unlink(missing_ok=True)
            empty.touch()
            return None
        os.replace(tmp, path)  # atomic: concurrent creators write the same content
        return path

    def _rebase(self, chunks: Iterable[bytes], out: io.BufferedWriter) -> int:
        """Copy the archive minus its top directory, owned by uid; returns the entry count."""
        count = 0
        with tarfile.open(fileobj=_ChunkFile(chunks), mode="r|") as src, tarfile.open(fileobj=out, mode="w|") as dst:
            for member in src:
                _, _, member.name = member.name.partition("/")
                if not member.name:
                    continue
                if member.islnk():
                    _, _, member.linkname = member.linkname.partition("/")
                member.uid = member.gid = self._uid
                member.uname = member.gname = ""
                dst.addfile(member, src.extractfile(member) if member.isreg() else None)
                count += 1
        return count


class _ChunkFile(io.RawIOBase):
    """A readable file over an iterator of byte chunks (for streaming tarfile)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buf:
            chunk = next(self._chunks, b"")
            if not chunk:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
