"""Helpers for tests that drive a real headless Chromium and real CLI subprocesses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
#: Screenshots land here (gitignored) for a person to look at.
ARTIFACTS = ROOT / "tests" / "artifacts"

#: Headless, no network of its own (no updates, sync or QUIC), runnable as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, *, dump_dom: bool = False, screenshot: Path | None = None, size: str = "1280,900",
             budget_ms: int = 4000, timeout: float = 45.0) -> str:
    """Load `url` in a fresh headless Chromium profile; return the DOM after scripts ran.

    ``--virtual-time-budget`` lets the page's own requests (Flower's tables load by
    AJAX) finish before the DOM is dumped or the screenshot taken.
    """
    binary = chromium_binary()
    assert binary, "chromium is not installed"
    with tempfile.TemporaryDirectory(prefix="mf-chromium-") as profile:
        args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                f"--virtual-time-budget={budget_ms}"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            args.append(f"--screenshot={screenshot}")
        if dump_dom:
            args.append("--dump-dom")
        proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megaflow(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``python -m megaflow ARGS`` in its own process group, output to `log`."""
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                               os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "megaflow", *args], env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process we started (only that process)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0, **kw) -> httpx.Response:
    """Poll `url` until it answers at all; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(url, timeout=2.0, **kw)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
