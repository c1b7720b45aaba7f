"""Live progress of a run: episodes by state, steps/s, mean reward, failures by kind.

In a terminal the panel redraws in place; in a log or a pipe a plain line is
printed whenever the counts change (at most every `log_every` seconds), so CI
logs show progress without control codes. The final counts are printed either way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from megaflow.db import states
from megaflow.ops.report import STATE_COLOURS
from megaflow.ops.stats import STATE_ORDER, failures_by_kind, run_span_s

ENDED = ("finished", "cancelled")


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


def info_line(st: dict, failures: dict[str, int], rate: float) -> str:
    """One plain line: state counts, steps, steps/s, mean reward, failures by kind."""
    ended = sum(st["by_state"].get(s, 0) for s in states.TERMINAL)
    line = (f"{ended}/{st['episodes']} ended | {_fmt_counts(_ordered(st['by_state']))} | "
            f"{st['steps']} steps, {rate:.1f} steps/s")
    if st["mean_reward"] is not None:
        line += f" | mean reward {st['mean_reward']:.3f}"
    line += f" | failures: {_fmt_counts(failures)}"
    if st.get("waiting"):
        line += f" | waiting: {_fmt_counts(st['waiting'])}"
    return line


def panel(st: dict, failures: dict[str, int], rate: float, elapsed: float) -> Panel:
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
    rates = Text(f"{st['steps']} steps · {rate:.1f} steps/s")
    if st["mean_reward"] is not None:
        rates.append(f" · mean reward {st['mean_reward']:.3f}")
    fails = Text("failures: ", style="bold")
    fails.append(_fmt_counts(failures), style="red" if failures else "dim")
    parts = [grid, rates, fails]
    if st.get("waiting"):
        waits = Text("waiting: ", style="bold")
        waits.append(_fmt_counts(st["waiting"]), style="yellow")
        parts.append(waits)
    title = f"run {st['run_id']} · {st['name']} · {st['status']} · {elapsed:.0f}s"
    return Panel(Group(*parts), title=title, expand=False)


def follow(client, run_id: str, console: Console, timeout: float | None = None,
           check: Callable[[], None] | None = None, poll: float = 0.5, log_every: float = 5.0) -> dict:
    """Show progress until the run is finished or cancelled; returns its final `Client.status`.

    Raises:
        TimeoutError: still running after `timeout` seconds.
    """
    start = time.monotonic()
    rate = StepRate()
    live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
    last_line, last_logged = "", 0.0
    try:
        if live:
            live.start()
        while True:
            now = time.monotonic()
            st = client.status(run_id)
            with client.session() as s:
                failures = failures_by_kind(s, run_id)
            r = rate.add(now, st["steps"])
            if live:
                live.update(panel(st, failures, r, now - start), refresh=True)
            else:
                line = info_line(st, failures, r)
                if line != last_line and now - last_logged >= log_every:
                    console.print(line, highlight=False, soft_wrap=True)
                    last_line, last_logged = line, now
            if st["status"] in ENDED:
                break
            if check:
                check()
            if timeout and now - start > timeout:
                raise TimeoutError(f"run {run_id} still {st['status']} after {timeout}s")
            time.sleep(poll)
    finally:
        if live:
            live.stop()
    with client.session() as s:
        span = run_span_s(s, run_id)
    # Over the whole run, not this watch: it may have started late or after the end.
    overall = st["steps"] / span if span else rate.add(time.monotonic(), st["steps"])
    console.print(f"run {run_id} {st['status']}: {info_line(st, failures, overall)}", highlight=False,
                  soft_wrap=True)
    return st
