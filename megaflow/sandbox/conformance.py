"""The one conformance suite every sandbox backend must pass.

Each check is a plain function ``check_xxx(backend, config)`` that creates what it
needs from `config`, cleans up after itself and raises `AssertionError` on failure.
A check marked ``needs_processes = True`` relies on real processes (background jobs,
symlinks, users); only the in-memory fake may skip those.

Usage::

    for check in CHECKS:
        if backend.name == "memory" and getattr(check, "needs_processes", False):
            continue
        check(backend, config)
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from megaflow.errors import SandboxClosedError, SandboxError, SandboxNotFoundError
from megaflow.sandbox.base import TRUNCATION_MARKER, Sandbox, SandboxBackend, SandboxConfig

_MARKER_RE = re.compile(re.escape(TRUNCATION_MARKER).replace(r"\{omitted\}", r"(\d+)"))


@contextmanager
def _sandbox(backend: SandboxBackend, config: SandboxConfig, **labels: str) -> Iterator[Sandbox]:
    sandbox = backend.create(config, {"conformance": "1", **labels})
    try:
        yield sandbox
    finally:
        sandbox.close()


def _raises(exc_type: type[BaseException], call: Callable[[], object], what: str) -> None:
    try:
        call()
    except exc_type:
        return
    except Exception as exc:  # a wrong exception type is a failed check, not a crash
        raise AssertionError(f"{what}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


def needs_processes(check: Callable[[SandboxBackend, SandboxConfig], None]) -> Callable:
    """Mark a check that only a backend running real processes can pass."""
    check.needs_processes = True  # type: ignore[attr-defined]
    return check


def check_exit_codes(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        for cmd, code in (("true", 0), ("false", 1), ("exit 3", 3), ("true && exit 4", 4), ("false; echo x", 0)):
            result = sb.exec(cmd, timeout=10)
            assert result.exit_code == code, f"{cmd!r}: exit {result.exit_code}, expected {code}"
            assert not result.timed_out, f"{cmd!r} reported a timeout"
        result = sb.exec("false && echo no || echo yes", timeout=10)
        assert (result.exit_code, result.stdout) == (0, "yes\n"), result
        result = sb.exec("megaflow-no-such-command", timeout=10)
        assert result.exit_code == 127, result
        assert "not found" in result.stderr, result


def check_stdout_stderr(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        result = sb.exec("echo out; echo err >&2; echo more", timeout=10)
        assert result.stdout == "out\nmore\n", result
        assert result.stderr == "err\n", result
        assert not result.truncated, result
        assert result.duration_s >= 0, result


def check_env(backend: SandboxBackend, config: SandboxConfig) -> None:
    env = {**config.env, "MF_GREETING": "hello world", "MF_EMPTY": ""}
    with _sandbox(backend, config.model_copy(update={"env": env})) as sb:
        result = sb.exec('echo "$MF_GREETING"; echo "[$MF_EMPTY][$MF_UNSET_VARIABLE]"', timeout=10)
        assert result.stdout == "hello world\n[][]\n", result


def check_workdir(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        assert sb.exec("pwd", timeout=10).stdout == config.workdir + "\n"
        sb.write_file("sub/f.txt", b"x")
        result = sb.exec("cd sub && pwd && cat f.txt", timeout=10)
        assert result.stdout == f"{config.workdir}/sub\nx", result
        # Every exec starts afresh in the work directory.
        assert sb.exec("pwd", timeout=10).stdout == config.workdir + "\n"


def check_files_roundtrip(backend: SandboxBackend, config: SandboxConfig) -> None:
    data = bytes(range(256)) * 64 + b"\0\0end\0"
    with _sandbox(backend, config) as sb:
        sb.write_file("bin/data.bin", data)
        assert sb.read_file("bin/data.bin") == data
        assert sb.read_file(f"{config.workdir}/bin/data.bin") == data
        sb.write_file(f"{config.workdir}/abs.txt", b"abs")
        assert sb.exec("cat abs.txt", timeout=10).stdout == "abs"
        sb.write_file("abs.txt", b"s")  # overwriting truncates
        assert sb.read_file("abs.txt") == b"s"
        sb.write_file("empty", b"")
        assert sb.read_file("empty") == b""
        result = sb.exec("printf 'a\\0b' > made.bin && echo more >> abs.txt", timeout=10)
        assert result.exit_code == 0, result
        assert sb.read_file("made.bin") == b"a\0b"
        assert sb.read_file("abs.txt") == b"smore\n"
        _raises(FileNotFoundError, lambda: sb.read_file("missing.txt"), "read of a missing file")
        _raises(FileNotFoundError, lambda: sb.read_file(f"{config.workdir}/nope/x"), "read of a missing path")


def check_path_escape(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        _raises(PermissionError, lambda: sb.write_file("../escape.txt", b"x"), "write to ../")
        _raises(PermissionError, lambda: sb.write_file("a/../../escape.txt", b"x"), "write to a/../../")
        _raises(PermissionError, lambda: sb.write_file("/etc/megaflow-escape", b"x"), "write outside the workdir")
        _raises(PermissionError, lambda: sb.read_file("../escape.txt"), "read of ../")


@needs_processes
def check_symlink_escape(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        assert sb.exec("ln -s /etc etc_link && ln -s /etc/hostname host_link", timeout=10).exit_code == 0
        _raises(PermissionError, lambda: sb.write_file("host_link", b"x"), "write through a symlink")
        _raises(PermissionError, lambda: sb.write_file("etc_link/megaflow", b"x"), "write under a symlinked dir")
        _raises(PermissionError, lambda: sb.read_file("host_link"), "read through a symlink")


def check_stdin_is_empty(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        result = sb.exec("cat", timeout=10)
        assert (result.exit_code, result.stdout, result.timed_out) == (0, "", False), result


def check_timeout(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        started = time.monotonic()
        result = sb.exec("echo before; sleep 30", timeout=0.5)
        elapsed = time.monotonic() - started
        assert result.exit_code == 124 and result.timed_out, result
        assert elapsed < 5, f"a 0.5 s timeout took {elapsed:.1f} s"
        assert sb.exec("echo ok", timeout=10).stdout == "ok\n", "sandbox unusable after a timeout"


@needs_processes
def check_timeout_kills_process_tree(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        started = time.monotonic()
        result = sb.exec("sleep 100 & (sleep 1.5; echo late > late.txt) & sleep 100", timeout=0.5)
        assert result.exit_code == 124 and result.timed_out, result
        assert time.monotonic() - started < 5, "background children held the exec past its deadline"
        time.sleep(max(0.0, started + 2.5 - time.monotonic()))
        _raises(FileNotFoundError, lambda: sb.read_file("late.txt"), "a background child outlived the timeout")


def check_output_truncation(backend: SandboxBackend, config: SandboxConfig) -> None:
    limit = 1024
    total = sum(len(f"{n}\n") for n in range(1, 100_001))
    with _sandbox(backend, config.model_copy(update={"max_output_bytes": limit})) as sb:
        assert not sb.exec("echo small", timeout=10).truncated
        for cmd, stream in (("seq 1 100000", "stdout"), ("seq 1 100000 >&2", "stderr")):
            result = sb.exec(cmd, timeout=30)
            text = getattr(result, stream)
            assert result.exit_code == 0 and result.truncated, result
            match = _MARKER_RE.search(text)
            assert match, f"{stream} has no truncation marker"
            kept = (text[: match.start()] + text[match.end() :]).encode()
            assert len(kept) <= limit, f"{stream} kept {len(kept)} bytes, limit {limit}"
            assert len(kept) + int(match.group(1)) == total, "kept + omitted bytes != output size"
            assert text.startswith("1\n2\n3\n") and text.endswith("\n99999\n100000\n"), "head or tail lost"


def check_reset(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        sb.write_file("a.txt", b"a")
        assert sb.exec("mkdir -p d && echo b > d/b.txt", timeout=10).exit_code == 0
        sb.reset()
        _raises(FileNotFoundError, lambda: sb.read_file("a.txt"), "file written before reset")
        _raises(FileNotFoundError, lambda: sb.read_file("d/b.txt"), "file made by a command before reset")
        assert sb.exec("pwd", timeout=10).stdout == config.workdir + "\n"
        sb.write_file("again.txt", b"ok")
        assert sb.exec("cat again.txt", timeout=10).stdout == "ok"


def check_close_idempotent(backend: SandboxBackend, config: SandboxConfig) -> None:
    run = uuid.uuid4().hex
    sb = backend.create(config, {"conformance": "1", "run": run})
    sandbox_id = sb.id
    sb.close()
    sb.close()
    _raises(SandboxClosedError, lambda: sb.exec("true", timeout=10), "exec after close")
    _raises(SandboxClosedError, lambda: sb.write_file("x", b""), "write_file after close")
    _raises(SandboxClosedError, lambda: sb.read_file("x"), "read_file after close")
    _raises(SandboxClosedError, sb.reset, "reset after close")
    assert backend.list_ids({"run": run}) == [], "a closed sandbox is still listed"
    _raises(SandboxNotFoundError, lambda: backend.attach(sandbox_id, config), "attach after close")
    backend.destroy(sandbox_id)


def check_attach(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        sb.write_file("state.txt", b"kept")
        other = backend.attach(sb.id, config)
        assert other.id == sb.id
        assert other.read_file("state.txt") == b"kept"
        assert other.exec("cat state.txt", timeout=10).stdout == "kept"
        other.write_file("back.txt", b"both ways")
        assert sb.read_file("back.txt") == b"both ways"
        backend.destroy(sb.id)
        backend.destroy(sb.id)
        _raises(SandboxError, lambda: sb.exec("true", timeout=10), "exec after destroy by id")
    _raises(SandboxNotFoundError, lambda: backend.attach("mf-000000000000", config), "attach of an unknown id")


def check_list_ids(backend: SandboxBackend, config: SandboxConfig) -> None:
    run = uuid.uuid4().hex
    with (
        _sandbox(backend, config, run=run, episode="1") as first,
        _sandbox(backend, config, run=run, episode="2") as second,
    ):
        assert sorted(backend.list_ids({"run": run})) == sorted([first.id, second.id])
        assert backend.list_ids({"run": run, "episode": "2"}) == [second.id]
        assert backend.list_ids({"run": run, "episode": "3"}) == []
        first.close()
        assert backend.list_ids({"run": run}) == [second.id]


def check_sandboxes_are_separate(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as one, _sandbox(backend, config) as two:
        assert one.id != two.id
        one.write_file("mine.txt", b"1")
        _raises(FileNotFoundError, lambda: two.read_file("mine.txt"), "a file seen from another sandbox")
        assert two.exec("cat mine.txt", timeout=10).exit_code != 0


@needs_processes
def check_runs_unprivileged(backend: SandboxBackend, config: SandboxConfig) -> None:
    with _sandbox(backend, config) as sb:
        result = sb.exec("id -u", timeout=10)
        assert result.exit_code == 0 and result.stdout.strip() not in ("", "0"), f"runs as root: {result}"


CHECKS: list[Callable[[SandboxBackend, SandboxConfig], None]] = [
    check_exit_codes,
    check_stdout_stderr,
    check_env,
    check_workdir,
    check_files_roundtrip,
    check_path_escape,
    check_symlink_escape,
    check_stdin_is_empty,
    check_timeout,
    check_timeout_kills_process_tree,
    check_output_truncation,
    check_reset,
    check_close_idempotent,
    check_attach,
    check_list_ids,
    check_sandboxes_are_separate,
    check_runs_unprivileged,
]
