"""The exec hop's command journal (`megaflow.hops.exec_journal`): a command runs once, a replay
returns its exit code, a command cut off mid-way is told apart."""

from __future__ import annotations

import subprocess

from megaflow.hops.exec_journal import LOST_OUTPUT, ResultCache, lost_output, replay_of, wrap
from megaflow.sandbox.base import ExecResult


def _bash(script: str, cwd) -> ExecResult:
    p = subprocess.run(["bash", "-lc", script], cwd=cwd, capture_output=True, text=True)
    return ExecResult(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr)


def test_journal_runs_a_command_once_and_keeps_its_exit_code(tmp_path):
    first = _bash(wrap("echo ran >> log; echo out; exit 3", "7"), tmp_path)
    assert (first.exit_code, first.stdout, replay_of(first)) == (3, "out\n", None)
    again = _bash(wrap("echo ran >> log; echo out; exit 3", "7"), tmp_path)
    assert replay_of(again) == ("done", 3)
    assert (tmp_path / "log").read_text() == "ran\n"  # not twice
    # Heredocs, quotes, `cd` and line numbers in errors behave as without the journal.
    assert _bash(wrap("cat <<EOF\nx 'y'\nEOF", "8"), tmp_path).stdout == "x 'y'\n"
    assert "line 1" in _bash(wrap("echo 'open", "9"), tmp_path).stderr
    # The journal never shows in git.
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True)
    assert ".megaflow" not in status.stdout


def test_journal_tells_a_command_cut_off_mid_way(tmp_path):
    (tmp_path / ".megaflow/exec").mkdir(parents=True)
    (tmp_path / ".megaflow/exec/4.started").write_text("")
    r = _bash(wrap("echo should-not-run", "4"), tmp_path)
    assert replay_of(r) == ("interrupted", None) and "should-not-run" not in r.stdout


def test_an_agent_printing_the_words_is_not_a_replay():
    assert replay_of(ExecResult(exit_code=0, stdout="done 0\n")) is None
    assert lost_output(2).exit_code == 2 and lost_output(2).stdout == LOST_OUTPUT


def test_result_cache_is_bounded():
    cache = ResultCache(size=2)
    for step in range(3):
        cache.put("sb", step, ExecResult(exit_code=step))
    assert cache.get("sb", 0) is None and cache.get("sb", 2).exit_code == 2
