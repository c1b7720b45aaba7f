"""Exactly-once commands: a journal inside the sandbox says whether a command already ran.

The ledger stops a *second message* from running a command while the first is
alive, but not the *same message* redelivered after its worker died between the
command's end and the recording of its result: that delivery would run the
command again. So every agent command runs inside a tiny wrapper that first
checks ``.megaflow/exec/<step>.rc`` (the command finished) and
``.megaflow/exec/<step>.started`` (it began), then marks ``started``, runs the
command in a subshell, and writes its exit code. A delivery that finds

* nothing: runs the command (the previous one died before starting it);
* ``rc``: does not run it again; the result comes from this process's cache of
  recent results (a retry after a database error), or, when another process ran
  it, the agent gets the exit code and a note that the output was lost
  (`lost_output`): the command's effect happened exactly once, so the episode goes on;
* ``started`` only: the command was cut off mid-way (the sandbox died with the
  worker); running it again could do half its work twice, so the episode ends
  ``infra_failed`` (``exec_interrupted``).

``megaflow resume`` re-runs such episodes as new attempts. The journal directory
carries a ``.gitignore`` of ``*``, so it never shows in ``git status`` or in a SWE
patch. The in-memory sandbox lives and dies with its worker, so it needs none.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from megaflow.sandbox.base import ExecResult

JOURNAL_DIR = ".megaflow/exec"
#: Marks the wrapper's own answer on a replay; an agent would have to read its
#: parent's command line to forge it, and would only fail its own episode.
_TOKEN = "@@megaflow-journal-5f0c2a@@"
_CACHE_SIZE = 128

_PROLOGUE = (
    '__mf_j={dir}; '
    'if [ -e "$__mf_j/{key}.rc" ]; then printf "%s done %s\\n" {token} "$(cat "$__mf_j/{key}.rc")"; exit 0; fi; '
    'if [ -e "$__mf_j/{key}.started" ]; then printf "%s interrupted\\n" {token}; exit 0; fi; '
    'mkdir -p "$__mf_j" 2>/dev/null && {{ [ -e .megaflow/.gitignore ] || printf "*\\n" > .megaflow/.gitignore; }} '
    '&& : > "$__mf_j/{key}.started" 2>/dev/null; '
)
# The command's first line shares line 1 with the prologue, so the shell's error
# messages ("line 3: syntax error") name the same lines as without the wrapper.
_EPILOGUE = '\n); __mf_rc=$?; printf "%s\\n" "$__mf_rc" > "$__mf_j/{key}.rc" 2>/dev/null; exit $__mf_rc'


def applies(sandbox_type: str) -> bool:
    """Whether commands in this kind of sandbox get journaled (not the in-process fake)."""
    return sandbox_type != "memory"


def wrap(cmd: str, key: str) -> str:
    """The command, journaled under `key` (the step index)."""
    fields = {"dir": JOURNAL_DIR, "key": key, "token": _TOKEN}
    return _PROLOGUE.format(**fields) + "( " + cmd + _EPILOGUE.format(**fields)


#: What the agent reads instead of a command's output that died with its worker.
LOST_OUTPUT = ("[megaflow: this command ran once, to completion, but its output was lost when the worker "
               "running it failed; it was not run again]")


def lost_output(exit_code: int | None) -> ExecResult:
    """The result of a command that ran to completion in a delivery that died before recording it."""
    return ExecResult(exit_code=exit_code if exit_code is not None else -1, stdout=LOST_OUTPUT)


def replay_of(result: ExecResult) -> tuple[str, int | None] | None:
    """("done", exit code) or ("interrupted", None) when the wrapper found an earlier run; else None."""
    if result.exit_code != 0 or not result.stdout.startswith(_TOKEN):
        return None
    words = result.stdout[len(_TOKEN):].split()
    if words[:1] == ["done"]:
        try:
            return "done", int(words[1])
        except (IndexError, ValueError):
            return "done", None
    if words[:1] == ["interrupted"]:
        return "interrupted", None
    return None


class ResultCache:
    """This process's most recent command results, so a retried hop need not lose its output."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[tuple[str, int], ExecResult] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, sandbox_id: str, step: int, result: ExecResult) -> None:
        with self._lock:
            self._items[(sandbox_id, step)] = result
            self._items.move_to_end((sandbox_id, step))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, sandbox_id: str, step: int) -> ExecResult | None:
        with self._lock:
            return self._items.get((sandbox_id, step))


def results_cache(rt) -> ResultCache:
    """The worker runtime's cache (made on first use)."""
    cache = getattr(rt, "_megaflow_exec_cache", None)
    if cache is None:
        cache = rt._megaflow_exec_cache = ResultCache()
    return cache
