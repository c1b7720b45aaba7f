"""Live progress of a run: episodes by state, steps/s, mean reward, failures by kind.

In a terminal the panel redraws in place; in a log or a pipe a plain line is
printed whenever the counts change (at most every `log_every` seconds), so CI
logs show progress without control codes. The final counts are printed either way.

When nothing changes (no episode moves, no step is taken) for `stall_after`
seconds, the view says which states are stuck and the last error recorded for the
run (a failed episode's error, a hop's retry, a poison message), or else the last
warning in the embedded stack's worker logs: a run never waits in silence.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sqlalchemy import select

from megaflow.db import states
from megaflow.db.models import Episode, Event
from megaflow.ops.report import STATE_COLOURS
from megaflow.ops.stats import STATE_ORDER, failures_by_kind, run_span_s

ENDED = ("finished", "cancelled")
#: Seconds without any change before the view calls the run stalled.
STALL_AFTER_S = 30.0
#: Log lines that may explain a stall (Celery's own format: "... WARNING/...", "ERROR").
_LOG_MARKS = ("WARNING", "ERROR", "CRITICAL", "Traceback", "cannot start")


@dataclass
class Stall:
    """A run that has not changed for `seconds`: its unfinished states and the last error found."""

    seconds: float
    stuck: dict[str, int]
    error: str | None

    def line(self) -> str:
        stuck = _fmt_counts(self.stuck)
        why = self.error or "no error recorded (MEGAFLOW_LOG_LEVEL=INFO makes the worker logs say more)"
        return f"no progress for {self.seconds:.0f}s: stuck {stuck}; last error: {why}"


def last_error(session, run_id: str) -> str | None:
    """The newest error recorded for a run: an event that carries one (a hop's retry, a poison
    message) or an ended episode's error, whichever is newer."""
    found: list[tuple] = []
    for ts, kind, data in session.execute(select(Event.ts, Event.kind, Event.data).where(Event.run_id == run_id)
                                          .order_by(Event.id.desc()).limit(200)):
        if isinstance(data, dict) and data.get("error"):
            found.append((ts, f"{kind}: {data['error']}"))
            break
    row = session.execute(select(Episode.finished_at, Episode.exit_status, Episode.error)
                          .where(Episode.run_id == run_id, Episode.error.is_not(None))
                          .order_by(Episode.finished_at.desc()).limit(1)).first()
    if row is not None:
        found.append((row[0], f"{row[1] or 'error'}: {row[2]}"))
    if not found:
        return None
    newest = max(found, key=lambda f: f[0] is not None and f[0].timestamp())
    return " ".join(newest[1].split())[:300]


def last_log_warning(logs: Sequence[Path], tail_bytes: int = 65536) -> str | None:
    """The newest warning or error line among worker logs (read from their ends only)."""
    best: tuple[float, str] | None = None
    for path in logs:
        try:
            mtime = path.stat().st_mtime
            with open(path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - tail_bytes))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        hits = [ln.strip() for ln in lines if any(m in ln for m in _LOG_MARKS)]
        if hits and (best is None or mtime > best[0]):
            best = (mtime, f"{path.name}: {hits[-1]}")
    return " ".join(best[1].split())[:300] if best else None


class StepRate:
    """Steps per second over a sliding window, so a watch attached mid-run reads the current pace."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, steps: int) -> float:
        self._samples.append((t, steps))
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, s0 = self._samples[0]
        return (steps - s0) / (t - t0) if t > t0 else 0.0


def _fmt_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items()) or "none"


def _ordered(by_state: dict[str, int]) -> dict[str, int]:
    return {s: by_state[s] for s in (*STATE_ORDER, *sorted(by_state)) if s in by_state}


def info_line(st: dict, failures: dict[str, int], rate: float, window: str) -> str:
    """One plain line: state counts, steps, steps/s over `window` (named: rates differ by window), mean reward, failures."""
    ended = sum(st["by_state"].get(s, 0) for s in states.TERMINAL)
    line = (f"{ended}/{st['episodes']} ended | {_fmt_counts(_ordered(st['by_state']))} | "
            f"{st['steps']} steps, {rate:.1f} steps/s ({window})")
    if st["mean_reward"] is not None:
        line += f" | mean reward {st['mean_reward']:.3f}"
    line += f" | failures: {_fmt_counts(failures)}"
    if st.get("waiting"):
        line += f" | waiting: {_fmt_counts(st['waiting'])}"
    return line


def panel(st: dict, failures: dict[str, int], rate: float, elapsed: float, stall: Stall | None = None,
          error: str | None = None, window: str = "") -> Panel:
    """The live view: one bar for episodes ended, one per state, and a line of rates."""
    n = max(1, st["episodes"])
    ended = sum(st["by_state"].get(s, 0) for s in states.TERMINAL)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right", style="bold")
    grid.add_column(width=40)
    grid.add_column(justify="right")
    grid.add_row("episodes", ProgressBar(total=n, completed=ended, width=40), f"{ended}/{st['episodes']}")
    for state in STATE_ORDER:
        count = st["by_state"].get(state, 0)
        colour = STATE_COLOURS.get(state, "white")
        grid.add_row(Text(state, style="dim" if not count else ""),
                     ProgressBar(total=n, completed=count, width=40, complete_style=colour, finished_style=colour),
                     str(count))
    rates = Text(f"{st['steps']} steps · {rate:.1f} steps/s ({window})")
    if st["mean_reward"] is not None:
        rates.append(f" · mean reward {st['mean_reward']:.3f}")
    fails = Text("failures: ", style="bold")
    fails.append(_fmt_counts(failures), style="red" if failures else "dim")
    parts = [grid, rates, fails]
    if failures and error:
        parts.append(Text(f"last error: {error}", style="red"))
    if st.get("waiting"):
        waits = Text("waiting: ", style="bold")
        waits.append(_fmt_counts(st["waiting"]), style="yellow")
        parts.append(waits)
    if stall:
        parts.append(Text(stall.line(), style="bold yellow"))
    title = f"run {st['run_id']} · {st['name']} · {st['status']} · {elapsed:.0f}s"
    return Panel(Group(*parts), title=title, expand=False)


def follow(client, run_id: str, console: Console, timeout: float | None = None,
           check: Callable[[], None] | None = None, poll: float = 0.5, log_every: float = 5.0,
           logs: Sequence[Path] | None = None, stall_after: float = STALL_AFTER_S) -> dict:
    """Show progress until the run is finished or cancelled; returns its final `Client.status`.

    Args:
        logs: worker logs to search for the reason of a stall (the embedded stack's).
        stall_after: seconds without change before the view says what is stuck and why.

    Raises:
        TimeoutError: still running after `timeout` seconds.
    """
    start = time.monotonic()
    rate = StepRate()
    recent = f"last {rate.window_s:g} s"
    live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
    last_line, last_logged = "", 0.0
    seen, changed_at, stall, stall_checked, error = None, start, None, 0.0, None
    try:
        if live:
            live.start()
        while True:
            now = time.monotonic()
            st = client.status(run_id)
            with client.session() as s:
                failures = failures_by_kind(s, run_id)
                state = (tuple(sorted(st["by_state"].items())), st["steps"])
                if state != seen:
                    seen, changed_at, stall = state, now, None
                    error = last_error(s, run_id) if failures else None
                elif now - changed_at >= stall_after and now - stall_checked >= log_every:
                    stall_checked = now
                    stall = Stall(now - changed_at, {k: v for k, v in _ordered(st["by_state"]).items()
                                                     if k not in states.TERMINAL},
                                  last_error(s, run_id) or (last_log_warning(logs) if logs else None))
            r = rate.add(now, st["steps"])
            if live:
                live.update(panel(st, failures, r, now - start, stall, error, window=recent), refresh=True)
            else:
                line = info_line(st, failures, r, recent)
                if stall:
                    line += f" | {stall.line()}"
                elif error:
                    line += f" | last error: {error}"
                # A stall's duration changes every check: log it at most every 30 s.
                key = line if not stall else info_line(st, failures, r, recent) + (stall.error or "")
                if (key != last_line and now - last_logged >= log_every) or (stall and now - last_logged >= 30):
                    console.print(line, highlight=False, soft_wrap=True)
                    last_line, last_logged = key, now
            if st["status"] in ENDED:
                break
            if check:
                check()
            if timeout and now - start > timeout:
                raise TimeoutError(f"run {run_id} still {st['status']} after {timeout:g}s "
                                   f"({_fmt_counts(_ordered(st['by_state']))})")
            time.sleep(poll)
    finally:
        if live:
            live.stop()
    with client.session() as s:
        span = run_span_s(s, run_id)
    # Over the whole run, not this watch: it may have started late or after the end.
    overall = st["steps"] / span if span else rate.add(time.monotonic(), st["steps"])
    window = "whole run" if span else recent
    last = f" | last error: {error}" if failures and error else ""
    console.print(f"run {run_id} {st['status']}: {info_line(st, failures, overall, window)}{last}", highlight=False,
                  soft_wrap=True)
    return st
