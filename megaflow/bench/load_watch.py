"""What `megaflow bench load` counts from outside MegaFlow: RabbitMQ's log, the workers' logs, the CPU.

None of it trusts MegaFlow's own records: a missed heartbeat is what RabbitMQ logged
when it closed a connection, an ack error what a worker's log says, the machine's
load what the kernel counted.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian's RabbitMQ writes its log.
RABBITMQ_LOGS = "/var/log/rabbitmq/*.log"

_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.]+\S*\s+\[\w+\]\s+(<[\d.]+>)\s?(.*)$")
_GRANTED = re.compile(r"granted access to vhost '([^']*)'")


@dataclass
class LogTail:
    """The lines appended to a set of log files after `start` (rotated or truncated files read from 0)."""

    pattern: str
    offsets: dict[str, int] = field(default_factory=dict)

    def start(self) -> LogTail:
        for path in self._paths():
            try:
                self.offsets[path] = os.path.getsize(path)
            except OSError:
                pass
        return self

    def _paths(self) -> list[str]:
        return sorted(p for p in glob.glob(self.pattern) if not p.endswith("_upgrade.log"))

    def readable(self) -> bool:
        return any(os.access(p, os.R_OK) for p in self._paths())

    def lines(self) -> list[str]:
        out: list[str] = []
        for path in self._paths():
            try:
                with open(path, "rb") as fh:
                    size = fh.seek(0, os.SEEK_END)
                    start = self.offsets.get(path, 0)
                    fh.seek(start if start <= size else 0)
                    out += fh.read().decode(errors="replace").splitlines()
            except OSError:
                continue
        return out


def rabbitmq_closures(lines: list[str], vhost: str) -> dict:
    """Connections of `vhost` that RabbitMQ closed for missed heartbeats, and all it closed abnormally.

    A connection's log lines carry its Erlang pid; the line that grants it access
    names its vhost, so only the bench's own connections (its private vhost) count.
    A multi-line entry's continuation lines belong to the pid of the entry before.
    """
    vhost_of: dict[str, str] = {}
    text_of: dict[str, list[str]] = {}
    pid = None
    for line in lines:
        m = _ENTRY.match(line)
        if m:
            pid, rest = m.group(1), m.group(2)
        elif pid is None:
            continue
        else:
            rest = line
        text_of.setdefault(pid, []).append(rest)
        g = _GRANTED.search(rest)
        if g:
            vhost_of[pid] = g.group(1)
    ours = [p for p, v in vhost_of.items() if v == vhost]
    missed = [p for p in ours if any("missed heartbeats" in t for t in text_of[p])]
    reset = [p for p in ours if any("client unexpectedly closed TCP connection" in t or "connection_closed_abruptly"
                                    in t for t in text_of[p])]
    return {"connections": len(ours), "missed_heartbeats": len(missed), "closed_abruptly": len(reset)}


def worker_log_counts(log_dir: Path) -> dict:
    """CRITICAL lines, failed acks and lost broker connections in the workers' own log files."""
    counts = {"ack_errors": 0, "worker_critical_lines": 0, "broker_connection_lost": 0}
    for path in sorted(Path(log_dir).glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "Couldn't ack" in line:
                counts["ack_errors"] += 1
            if "CRITICAL/" in line or "[CRITICAL]" in line:
                counts["worker_critical_lines"] += 1
            if "Connection to broker lost" in line:
                counts["broker_connection_lost"] += 1
    return counts


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of the machine's CPU time that was busy between two `cpu_times` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else 0.0


def longest_gap_s(starts: list[float], since: float | None = None) -> float:
    """The longest time with no hop starting, from `since` (the submit) through the last start."""
    times = sorted(starts)
    if since is not None:
        times = [since, *[t for t in times if t >= since]]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
