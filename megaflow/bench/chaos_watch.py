"""What `megaflow bench chaos` checks without trusting the ledger.

* `SandboxWatcher`: sandboxes counted from the *outside* all through the run — the
  containers carrying the run's host label (``docker ps`` polled, and the engine's
  create/destroy events), or the sandbox directories (and their processes) of the
  local backend — for ``peak_sandboxes`` against the host's capacity and for what is
  left after the workers' own reaping.
* `sandbox_accounting`: duplicated and lost commands, read from what the sandboxes
  printed (each command appends its step to ``trace.txt``, toggles its own line of
  ``patch.txt`` and prints both; the last command prints the whole trace and patch)
  and from the rewards (the check passes only if the trace is ``0 1 … n-1`` and every
  patch line is toggled exactly once).
* `classify_infra_failures`: each ``infra_failed`` episode is *injected* (an injected
  fault outlasted what the platform promises to survive) or *self-made*; see its doc.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import subprocess
import threading
import time
from pathlib import Path

from megaflow.db.states import ExitStatus

log = logging.getLogger(__name__)

#: The label every sandbox carries with its host's name (megaflow.reaper.HOST_LABEL).
HOST_LABEL = "megaflow.host"
_STEP_RE = re.compile(r"trace (\d+) patch (\d+) line (\w+)")
_FINAL_RE = re.compile(r"final ([0-9 ]*)\|([a-z ]*)")


class SandboxWatcher(threading.Thread):
    """Counts the run's sandboxes from outside the platform, every `interval_s`, until stopped.

    Docker: containers labelled ``megaflow.host=<host>`` (any state: a stopped container
    still holds its disk and is not destroyed) by polling, and a second count kept
    from the engine's create/destroy events, so a sandbox that lived between two polls
    still counts. Local: directories ``mf-*`` under ``<data_dir>/sandboxes``.
    """

    def __init__(self, sandbox: str, host: str, data_dir: Path, interval_s: float = 0.25):
        super().__init__(name="megaflow-chaos-watch", daemon=True)
        self.sandbox, self.host, self.data_dir, self.interval_s = sandbox, host, data_dir, interval_s
        self.peak = self.peak_events = self.current = 0
        self.samples = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()
        self._events_stream = None
        self._api = None
        if sandbox == "docker":
            import docker

            self._api = docker.from_env(timeout=30).api
            threading.Thread(target=self._follow_events, name="megaflow-chaos-events", daemon=True).start()

    def count(self) -> int:
        """Sandboxes of the run's host that exist now."""
        if self._api is not None:
            return len(self._api.containers(all=True, quiet=True, filters={"label": f"{HOST_LABEL}={self.host}"}))
        root = self.data_dir / "sandboxes"
        try:
            return sum(1 for p in root.iterdir() if p.name.startswith("mf-"))
        except FileNotFoundError:
            return 0

    def processes(self) -> int:
        """Processes still running inside the local backend's sandboxes (0 for docker: its containers count)."""
        if self._api is not None:
            return 0
        out = subprocess.run(["pgrep", "-f", str(self.data_dir / "sandboxes")], capture_output=True, text=True)
        return len(out.stdout.split())

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.current = self.count()
                self.peak = max(self.peak, self.current)
                self.samples += 1
            except Exception as exc:  # the engine is busy: the next poll counts
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            self._stop_event.wait(self.interval_s)

    def _follow_events(self) -> None:
        live: set[str] = set()
        try:
            self._events_stream = self._api.events(decode=True, filters={
                "type": "container", "event": ["create", "destroy"], "label": f"{HOST_LABEL}={self.host}"})
            for ev in self._events_stream:
                cid = ev.get("id") or ev.get("Actor", {}).get("ID")
                if ev.get("Action") == "create":
                    live.add(cid)
                elif ev.get("Action") == "destroy":
                    live.discard(cid)
                self.peak_events = max(self.peak_events, len(live))
        except Exception as exc:  # closed at stop, or the engine went away
            if not self._stop_event.is_set():
                self.errors.append(f"events: {type(exc).__name__}: {exc}"[:200])

    def stop(self) -> None:
        self._stop_event.set()
        if self._events_stream is not None:
            try:
                self._events_stream.close()
            except Exception:
                pass
        if self.is_alive():
            self.join(timeout=10)

    def figures(self) -> dict:
        return {"peak_sandboxes": max(self.peak, self.peak_events), "peak_sandboxes_polled": self.peak,
                "peak_sandboxes_from_events": self.peak_events if self.sandbox == "docker" else None,
                "watch_samples": self.samples, "watch_errors": self.errors}


def sandbox_accounting(episodes: list, steps_by_episode: dict[str, list], n_commands: int) -> dict:
    """Duplicated and lost commands as the sandboxes saw them, and rewards that disagree.

    Args:
        episodes: current attempts (rows with ``id``, ``state``, ``reward``).
        steps_by_episode: episode id → [(index, action, observation)].
        n_commands: side-effecting commands per episode (steps ``0 … n-1``; step ``n`` reports).

    Each episode counts once per command too many or missing, whichever evidence shows
    more: the counts every command printed, the final report, or — when neither is
    there — a succeeded episode whose check failed (reward ≠ 1) counts one.
    """
    duplicated = lost = wrong = 0
    per_episode: dict[str, dict] = {}
    for ep in episodes:
        extra = missing = 0
        for index, action, obs in steps_by_episode.get(ep.id, []):
            if not action or obs is None:
                continue
            m = _STEP_RE.search(obs)
            if m and index < n_commands:
                trace, line = int(m[1]), m[3]
                # Its own patch line off again after its toggle: the command ran twice.
                extra = max(extra, trace - (index + 1), 1 if line == "off" else 0)
                missing = max(missing, (index + 1) - trace)
            f = _FINAL_RE.search(obs)
            if f and index >= n_commands:
                seq = [int(x) for x in f[1].split()]
                toggles = f[2].split()
                extra = max(extra, len(seq) - len(set(seq)), sum(1 for x in seq if x >= n_commands))
                missing = max(missing, len(set(range(n_commands)) - set(seq)))
                off = sum(1 for t in toggles if t != "on")
                # A line toggled twice is off again (a duplicate); one never toggled too (a loss):
                # the trace says which, so the toggles only add what the trace cannot explain.
                extra = max(extra, off - missing)
        if ep.state == "succeeded" and ep.reward != 1.0:
            wrong += 1
            if not extra and not missing:
                extra = 1  # the check saw a change the printed counts did not show
        if extra or missing:
            per_episode[ep.id] = {"duplicated": extra, "lost": missing, "state": ep.state, "reward": ep.reward}
        duplicated += extra
        lost += missing
    return {"duplicate_commands": duplicated, "commands_lost": lost, "wrong_rewards": wrong,
            "commands_off_trace": dict(list(per_episode.items())[:10])}


#: Exit statuses an injected SIGKILL of an env worker may legitimately cause (a command
#: cut mid-way is never re-run: the exactly-once contract).
KILL_CAUSED = {ExitStatus.EXEC_INTERRUPTED: "env"}
#: Words of an error that show a service outage (database or broker unreachable).
_OUTAGE_WORDS = ("OperationalError", "InterfaceError", "connection", "Connection", "AMQP", "server closed")


def _ts(value) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def classify_infra_failures(failed: list[dict], kill_times: list[tuple[float, str]], restarts: list[dict],
                            max_deliveries: int, retry_horizon_s: float = 240.0) -> list[dict]:
    """Label each infra-failed episode ``injected`` or ``self-made``, saying why.

    Rule (one of these, else self-made):

    * ``exec_interrupted`` is injected iff an env worker was SIGKILLed while that command
      could have been running (from the moment it was decided, its step's row, − 1 s, to
      the episode's end) and its exec hop was delivered more than once: the platform
      promises never to run a command twice, so a command cut mid-way ends its episode.
    * ``poison`` is injected iff the pool of the poisoned hop was SIGKILLed at least
      ``max_deliveries`` times during the episode (each delivery can have died with a kill).
    * any exit whose error names an unreachable database or broker is injected iff it
      ended during a service restart or within `retry_horizon_s` after it (the retries
      that an outage outlasted).

    Everything else — ``evaluation_failed`` (a sandbox gone before its evaluation),
    ``sandbox_lost``, ``provision_failed``/``setup_failed`` (no sandbox fault is injected),
    ``*_crashed``, ``rebuild_failed``, ``model_unavailable`` (the model is scripted), a
    poison or interruption without the kills to explain it — is self-made.

    Args:
        failed: dicts with ``id``, ``exit_status``, ``error``, ``started_at``, ``finished_at``,
            ``exec_decided_at`` (when the episode's last command was decided, or None),
            ``exec_attempts`` (deliveries of its exec hop)
            and ``poison_hop`` (pool of the poisoned hop, or None).
    """
    out = []
    for ep in failed:
        status, error = ep.get("exit_status") or "?", ep.get("error") or ""
        end = _ts(ep.get("finished_at")) or time.time()
        begin = _ts(ep.get("started_at")) or 0.0
        cause, why = "self-made", f"{status} is not something an injected fault explains"
        if status in KILL_CAUSED:
            since = (_ts(ep.get("exec_decided_at")) or begin) - 1.0
            kills = [t for t, pool in kill_times if pool == KILL_CAUSED[status] and since <= t <= end + 1.0]
            before = [end - t for t, pool in kill_times if pool == KILL_CAUSED[status] and t <= end + 1.0]
            if kills and (ep.get("exec_attempts") or 2) > 1:
                cause, why = "injected", (f"env worker SIGKILLed {kills[-1] - since - 1.0:.1f}s after the command "
                                          f"was decided, {end - kills[-1]:.1f}s before the episode ended")
            elif kills:
                why = "an env worker was killed, but the command's exec hop was delivered only once"
            else:
                why = (f"no env worker was killed between the command's decision and the episode's end "
                       f"(last env kill {min(before):.1f}s before the end)" if before else "no env worker was killed")
        elif status == ExitStatus.POISON:
            pool = ep.get("poison_hop") or "env"
            kills = [t for t, p in kill_times if p == pool and begin - 1.0 <= t <= end + 1.0]
            if len(kills) >= max_deliveries:
                cause, why = "injected", f"{len(kills)} {pool} kills during the episode"
            else:
                why = f"only {len(kills)} {pool} kills during the episode (< {max_deliveries} deliveries)"
        elif any(w in error for w in _OUTAGE_WORDS):
            for r in restarts:
                if r.get("start") and r["start"] - 1.0 <= end <= r["end"] + retry_horizon_s:
                    cause, why = "injected", f"{r['service']} restart outlasted the retries"
                    break
        out.append({"episode": ep["id"], "exit_status": status, "cause": cause, "why": why, "error": error[:200]})
    return out


def _ok(value, limit=0) -> bool:
    return value is not None and value <= limit


def targets(fig: dict) -> dict[str, bool]:
    """The targets of issues #16 and #22, each True when it held in this run (before any resume)."""
    cap = fig.get("capacity")
    return {
        "episodes_lost == 0": _ok(fig.get("episodes_lost")),
        "chords_unclosed == 0": _ok(fig.get("chords_unclosed")),
        "duplicate_commands == 0": _ok(fig.get("duplicate_commands")),
        "commands_lost == 0": _ok(fig.get("commands_lost")),
        "infra_failed_self_made == 0": _ok(fig.get("infra_failed_self_made")),
        "peak_sandboxes <= capacity": cap is not None and _ok(fig.get("peak_sandboxes"), cap),
        "leaked_after_run == 0": _ok(fig.get("leaked_after_run")),
    }
