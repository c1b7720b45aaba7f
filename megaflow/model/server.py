"""Start and stop a real OpenAI-compatible model server, for tests and benchmarks.

The server is `python -m megaflow.model.serve` (see that module for why not
`transformers serve`) on a free localhost port, in a child process, so the HTTP client
is tested against a real model across a real socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def openai_server(
    model: str = "smollm2",
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 20.0,
    context_tokens: int = 8192,
    version: str = "",
    startup_timeout_s: float = 180.0,
) -> Iterator[str]:
    """Run an OpenAI-compatible server on `model` while the block runs.

    Args:
        model: 'smollm2' (the shipped weights) or a local model path.
        max_batch_size: The server's largest batch.
        max_wait_ms: How long the server gathers a batch.
        context_tokens: The server's context limit (small values exercise the 400 path).
        version: Weights version the server reports.
        startup_timeout_s: How long to wait for the model to load.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:43117/v1``.

    Raises:
        RuntimeError: the server exited before it was ready (its log is in the message).
        TimeoutError: it was not ready within `startup_timeout_s`.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "megaflow.model.serve",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
        "--context-tokens", str(context_tokens), "--version", version, "--log-level", "WARNING",
    ]  # fmt: skip
    # The child must import this very package, installed or not, and never reach a hub.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            _wait_ready(process, f"http://127.0.0.1:{port}/health", startup_timeout_s, log)
            logger.info("model server pid %d ready at %s", process.pid, base_url)
            yield base_url
        finally:
            _stop(process)


def _wait_ready(process: subprocess.Popen, health_url: str, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"model server exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(health_url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet: the model is still loading
        time.sleep(0.25)
    raise TimeoutError(f"model server not ready after {timeout_s:.0f}s:\n{_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log, limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]
