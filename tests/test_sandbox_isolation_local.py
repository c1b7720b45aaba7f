"""Attacks on the local (bubblewrap) sandbox: each must be contained, the host unharmed."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import need

from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.local import LocalBackend

pytestmark = pytest.mark.integration

CONFIG = SandboxConfig(pids=64, memory_mb=512, max_output_bytes=4096)


def processes_of(uid: int) -> set[int]:
    """Live (not zombie) pids on the host whose real uid is `uid`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            # A zombie runs nothing; orphaned bwrap monitors wait there for the host's init.
            zombie = re.search(r"^State:\s+Z", status, re.MULTILINE)
            if not zombie and int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1)) == uid:
                pids.add(int(entry.name))
    return pids


@pytest.fixture
def backend(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    backend = LocalBackend(tmp_path)
    before = processes_of(backend.host_uid)
    yield backend
    # The host is unharmed: it can still fork, and no sandboxed process is left.
    assert subprocess.run(["true"], check=False).returncode == 0
    deadline = time.monotonic() + 3
    while (left := processes_of(backend.host_uid) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"sandbox processes survived: {left}"


@pytest.fixture
def sandbox(backend):
    sb = backend.create(CONFIG, {"test": "isolation"})
    yield sb
    sb.close()


def test_fork_bomb_hits_the_pids_limit(sandbox):
    started = time.monotonic()
    result = sandbox.exec(":(){ :|:& };:; sleep 30", timeout=3)
    assert time.monotonic() - started < 8
    assert result.exit_code == 124 and result.timed_out
    assert "Resource temporarily unavailable" in result.stderr
    assert sandbox.exec("echo alive", timeout=10).stdout == "alive\n"


def test_memory_hog_hits_the_memory_limit(sandbox):
    result = sandbox.exec("python3 -c 'b = bytearray(2 << 30); print(len(b))'", timeout=20)
    assert result.exit_code != 0 and not result.timed_out
    assert "MemoryError" in result.stderr
    assert sandbox.exec("python3 -c 'b = bytearray(64 << 20); print(len(b))'", timeout=20).exit_code == 0


def test_infinite_loop_is_killed_at_the_deadline(sandbox):
    started = time.monotonic()
    result = sandbox.exec("while :; do :; done", timeout=1)
    assert result.exit_code == 124 and result.timed_out
    assert time.monotonic() - started < 4


def test_100mb_on_both_streams_is_capped_without_deadlock(sandbox):
    size = 100_000_000
    started = time.monotonic()
    result = sandbox.exec(f"(yes e | head -c {size} >&2) & yes | head -c {size}; wait", timeout=60)
    assert time.monotonic() - started < 30
    assert result.exit_code == 0 and result.truncated
    for text in (result.stdout, result.stderr):
        assert f"{size - CONFIG.max_output_bytes} bytes omitted" in text
        assert len(text) < CONFIG.max_output_bytes + 200
    assert result.stdout.startswith("y\ny\n") and result.stderr.endswith("e\ne\n")


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(2)
    yield server
    server.close()


def test_network_is_off_by_default(sandbox, listener):
    port = listener.getsockname()[1]
    for target in (f"127.0.0.1/{port}", "127.0.0.1/5672", "1.1.1.1/53"):
        result = sandbox.exec(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{target}' && echo connected", timeout=10)
        assert result.exit_code != 0 and "connected" not in result.stdout, target
    probe = "import socket; socket.create_connection(('10.0.0.1', 80), timeout=3)"
    assert "Network is unreachable" in sandbox.exec(f'python3 -c "{probe}"', timeout=10).stderr
    with pytest.raises(TimeoutError):
        listener.accept()


def test_network_flag_shares_the_host_network(backend, listener):
    port = listener.getsockname()[1]
    sb = backend.create(CONFIG.model_copy(update={"network": True}), {"test": "isolation"})
    try:
        result = sb.exec(f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo connected", timeout=10)
        assert result.stdout == "connected\n", result
    finally:
        sb.close()


def test_cannot_write_outside_the_work_directory(sandbox):
    marker = f"megaflow-escape-{uuid.uuid4().hex}"
    for where in ("/usr", "/etc", "", "/dev", "/proc", "/work/.."):
        path = f"{where}/{marker}"
        result = sandbox.exec(f"echo x > {path}", timeout=10)
        assert result.exit_code != 0, path
    # /tmp is writable but private: nothing reaches the host's /tmp.
    assert sandbox.exec(f"echo x > /tmp/{marker}", timeout=10).exit_code == 0
    assert not Path("/tmp", marker).exists()
    assert sandbox.exec(f"cat /tmp/{marker}", timeout=10).exit_code != 0, "/tmp outlived its exec"
    for path in (f"/etc/{marker}", f"../{marker}", f"../../{marker}", f"/tmp/{marker}"):
        with pytest.raises(PermissionError):
            sandbox.write_file(path, b"x")
    assert sandbox.exec("ln -s / root_link", timeout=10).exit_code == 0
    with pytest.raises(PermissionError):
        sandbox.write_file(f"root_link/tmp/{marker}", b"x")
    assert not Path("/tmp", marker).exists()


def test_cannot_read_host_files(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAFLOW_HOST_SECRET", "s3cret")
    secret = Path("/tmp", f"megaflow-secret-{uuid.uuid4().hex}")
    secret.write_text("s3cret")
    try:
        here = Path(__file__).resolve()
        for cmd in ("cat /etc/shadow", "ls /root", "ls /home", f"cat {secret}", f"cat {here}", f"ls {tmp_path}"):
            result = sandbox.exec(cmd, timeout=10)
            assert result.exit_code != 0 and "s3cret" not in result.stdout, cmd
        assert "s3cret" not in sandbox.exec("env", timeout=10).stdout
        for path in ("/etc/shadow", "/root/.bashrc", str(secret)):
            with pytest.raises((FileNotFoundError, PermissionError)):
                sandbox.read_file(path)
        # /etc/passwd inside is a synthetic one, not the host's.
        assert sandbox.read_file("/etc/passwd").count(b"\n") == 3
    finally:
        secret.unlink()


def test_nothing_outlives_the_exec(sandbox):
    started = time.monotonic()
    result = sandbox.exec(
        "(sleep 1; echo late > late1.txt) & disown; "
        "setsid bash -c 'sleep 1; echo late > late2.txt' & "
        "nohup bash -c 'sleep 1; echo late > late3.txt' >/dev/null 2>&1 & "
        "echo started",
        timeout=10,
    )
    assert result.stdout == "started\n" and time.monotonic() - started < 1
    time.sleep(1.5)
    for name in ("late1.txt", "late2.txt", "late3.txt"):
        with pytest.raises(FileNotFoundError):
            sandbox.read_file(name)


def test_sandbox_user_is_not_root_on_the_host(backend, sandbox):
    sandbox.exec("echo x > owned.txt", timeout=10)
    owner = os.stat(backend.root / sandbox.id / "work" / "owned.txt").st_uid
    assert owner == backend.host_uid
    assert owner != 0
    assert sandbox.exec("id -u", timeout=10).stdout == "1000\n"
