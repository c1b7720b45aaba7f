"""Clean stops and restarts: `megaflow run` and `megaflow up` stop every worker on SIGINT, SIGTERM and
SIGHUP, and a stack starting on a data directory with an unfinished run says how to continue it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

#: Runs for minutes (hundreds of quick steps) in the in-memory sandbox: always mid-run when signalled.
LONG_SPEC = """
name: long
rollouts: 1
model: {type: scripted, replies: ["```bash\\necho {step}\\n```"], latency_s: 0.05}
agent: {type: bash}
sandbox: {type: memory}
limits: {max_steps: 1000}
tasks:
  - {instance_id: forever, instruction: Never ends., check: "true"}
"""


class Megaflow:
    """`python -m megaflow ARGS` in the background on a private data directory, its output collected."""

    def __init__(self, args: list[str], data_dir: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
        env["MEGAFLOW_DATA_DIR"] = str(data_dir)
        self.proc = subprocess.Popen([sys.executable, "-m", "megaflow", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{self.output}"
            time.sleep(0.2)

    def workers(self, n: int = 3, timeout: float = 60.0) -> list[psutil.Process]:
        """The celery worker processes it started, once `n` are up."""
        deadline = time.monotonic() + timeout
        while True:
            found = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                     if "celery" in " ".join(p.cmdline())]
            if len(found) >= n:
                return found
            assert time.monotonic() < deadline, f"{len(found)} workers after {timeout}s:\n{self.output}"
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
        self.proc.wait()


def _gone(procs: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after `timeout`."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_megaflow_run_stops_its_workers_on(sig, tmp_path):
    spec = tmp_path / "long.yaml"
    spec.write_text(LONG_SPEC)
    mf = Megaflow(["run", str(spec)], tmp_path / "data")
    try:
        workers = mf.workers()
        mf.wait_for("1 episodes")  # submitted: the run is in flight
        time.sleep(1.0)
        mf.proc.send_signal(sig)
        rc = mf.proc.wait(timeout=60)
        survivors = _gone(workers)
        assert not survivors, f"workers left running after {sig.name}: {[p.pid for p in survivors]}"
        assert rc == 128 + sig, mf.output
        assert f"stopped by {sig.name}: workers stopped; run " in mf.output
        assert "`megaflow resume " in mf.output
    finally:
        mf.kill()


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_megaflow_up_stops_its_workers_on(sig, tmp_path):
    mf = Megaflow(["up"], tmp_path / "data")
    try:
        workers = mf.workers()
        mf.wait_for("stack up")
        mf.proc.send_signal(sig)
        rc = mf.proc.wait(timeout=60)
        survivors = _gone(workers)
        assert not survivors, f"workers left running after {sig.name}: {[p.pid for p in survivors]}"
        assert rc == 0, mf.output
        assert not list((tmp_path / "data" / "stacks").glob("*.pid")), "the stack's pid file stays behind"
    finally:
        mf.kill()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_stack_names_the_runs_an_earlier_one_left_unfinished(tmp_path):
    from megaflow import Client, RunSpec, Settings
    from megaflow.db.schema import upgrade

    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    upgrade(settings.resolved_database_url())
    # Submitted with no stack running: recorded and queued, never run (as after a stack killed with -9).
    spec = tmp_path / "long.yaml"
    spec.write_text(LONG_SPEC)
    run_id = Client(settings).submit(RunSpec.load(spec))
    mf = Megaflow(["up"], settings.data_dir)
    try:
        # Printed right after "stack up": wait for it rather than read the output at that instant.
        mf.wait_for(f"run {run_id} (long) was left unfinished by an earlier stack (0/1 episodes ended): its "
                    f"queued work goes on here; if it makes no progress, `megaflow resume {run_id}` runs")
        mf.proc.send_signal(signal.SIGTERM)
        assert mf.proc.wait(timeout=60) == 0
    finally:
        mf.kill()


def test_a_second_stack_on_the_same_directory_does_not_call_the_first_ones_runs_unfinished(tmp_path):
    from megaflow.local_stack import LocalStack
    from megaflow import Settings

    settings = Settings(data_dir=tmp_path)
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / f"{os.getppid()}.pid").write_text("")  # a live process: another stack
    (tmp_path / "stacks" / "999999999.pid").write_text("")  # no such process: stale
    stack = LocalStack(settings)
    assert stack._others_alive()
    assert not (tmp_path / "stacks" / "999999999.pid").exists()
    (tmp_path / "stacks" / f"{os.getppid()}.pid").unlink()
    assert not stack._others_alive()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_run_timeout_says_what_it_does_and_stops_the_workers(tmp_path):
    spec = tmp_path / "long.yaml"
    spec.write_text(LONG_SPEC)
    mf = Megaflow(["run", str(spec), "--timeout", "4"], tmp_path / "data")
    try:
        workers = mf.workers()
        rc = mf.proc.wait(timeout=90)
        out = " ".join(mf.output.split())
        assert rc == 4, out
        assert "still running after 4s" in out and "workers stopped; the run stays unfinished: `megaflow resume " in out
        assert not _gone(workers)
    finally:
        mf.kill()
