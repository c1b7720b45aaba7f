"""Deferred seeding: `DockerBackend.create(..., defer_seed=True)` against a real engine.

The first `exec` streams the work directory's content into the container on its
stdin and runs the command in the same exec; every other first operation puts it
the old way. What the command sees must be what it sees after an eager create.
Engine discovery as in ``test_sandbox_docker.py``: skips without one, fails under CI=true.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The engine, its client and the backend (which removes what the tests leave) are that file's.
from test_sandbox_docker import SESSION, backend, docker_client, docker_url  # noqa: F401 - fixtures

import docker
from megaflow.errors import SandboxError
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.docker import DockerBackend, DockerSandbox
from megaflow.sandbox.images import build_image

pytestmark = pytest.mark.integration

TAG = "megaflow/test-seed-modes"
# Root-owned content of every kind the seed must carry over unchanged: modes the
# umask would strip (0666, setgid), a read-only directory holding a file, links,
# an empty directory, a name with a space, an old mtime, and a git repository.
DOCKERFILE = r"""FROM megaflow/base
RUN mkdir -p /work/repo/sub/empty /work/repo/ro && cd /work/repo \
 && printf 'a\n' > a.txt && printf '#!/bin/sh\necho run\n' > run.sh && chmod 0755 run.sh \
 && printf 'secret\n' > private && chmod 0600 private \
 && printf 'open\n' > shared && chmod 0666 shared \
 && printf 'x\n' > ro/inner && chmod 0444 ro/inner && chmod 0555 ro \
 && ln -s a.txt link && ln a.txt hard && printf 'sp\n' > 'with space' && chmod 2775 sub \
 && git init -q && git -c user.email=t@t -c user.name=t add -A \
 && git -c user.email=t@t -c user.name=t commit -qm init \
 && touch -d '2020-01-02 03:04:05' a.txt
"""
# Everything about the work directory's content but the directory's own mtime (the
# moment of filling) and ctimes/inodes (never equal between two containers).
PROBE = (
    "find . -mindepth 1 -printf '%m %U %G %T@ %s %n %y %p -> %l\\n' | sort; "
    "ls -lnRA --time-style=full-iso; git --no-optional-locks -C repo status --porcelain; "
    "stat -c '%a %U %G %n' .; stat -c '%a %U %G %s %Y %n' repo repo/a.txt repo/shared repo/ro repo/sub; "
    "env | grep -v -e ^HOSTNAME= -e ^MEGAFLOW_EXEC_ID= | sort; echo \"$0 $- $SHLVL\"; "
    "readlink /proc/$$/fd/0"
)


@pytest.fixture(scope="module")
def image(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("seed-image")
    (context / "Dockerfile").write_text(DOCKERFILE)
    build_image(docker_client, context, TAG, network_mode="none")
    return TAG


@pytest.fixture
def config(image: str) -> SandboxConfig:
    return SandboxConfig(type="docker", image=image, memory_mb=256, pids=64)


@pytest.fixture
def make(backend: DockerBackend, config: SandboxConfig) -> Iterator:
    made: list[DockerSandbox] = []

    def make(defer_seed: bool = True) -> DockerSandbox:
        made.append(backend.create(config, {"test": SESSION}, defer_seed=defer_seed))
        return made[-1]

    yield make
    for sb in made:
        sb.close()


@pytest.fixture
def puts(backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the engine was asked to put archives at (counts the old way of seeding)."""
    calls: list[str] = []
    real = backend.api.put_archive

    def put_archive(container: str, path: str, data: object) -> bool:
        calls.append(path)
        return real(container, path, data)

    monkeypatch.setattr(backend.api, "put_archive", put_archive)
    return calls


def test_first_exec_sees_what_an_eager_create_gives(make, puts: list[str]) -> None:
    eager = make(defer_seed=False)
    assert puts == ["/work"]
    deferred = make()
    assert puts == ["/work"], "a deferred create put the seed"
    want, got = eager.exec(PROBE, timeout=30), deferred.exec(PROBE, timeout=30)
    assert puts == ["/work"], "the first exec put the seed the old way"
    assert got.exit_code == want.exit_code == 0, got.stderr
    assert got.stdout == want.stdout
    assert got.stderr == want.stderr == ""
    assert "repo/shared" in got.stdout and "666 1000 1000" in got.stdout  # modes kept, owner the agent
    # Later commands run the plain way, on the filled directory.
    assert deferred.exec(PROBE, timeout=30).stdout == want.stdout
    assert deferred.read_file("repo/private") == b"secret\n"
    assert puts == ["/work"]


def test_the_command_runs_as_a_plain_exec(make) -> None:
    result = make().exec("cat; echo out; echo err >&2; exit 7", timeout=10)
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert not result.timed_out
    assert result.duration_s < 5, "cat waited on stdin"
    big = make().exec("head -c 300000 /dev/zero | tr '\\0' x", timeout=10)
    assert big.truncated and len(big.stdout) < 70_000


def test_a_timeout_still_kills_the_tree(make) -> None:
    sb = make()
    started = time.monotonic()
    result = sb.exec("sleep 60 & sleep 60; echo never", timeout=1)
    assert (result.exit_code, result.timed_out, result.stdout) == (124, True, "")
    assert time.monotonic() - started < 5
    assert sb.exec("pgrep -x sleep | wc -l; cat repo/a.txt", timeout=10).stdout == "1\na\n"  # the keep-alive


@pytest.mark.parametrize("first", ["write_file", "read_file", "spawn", "reset", "settle"])
def test_any_other_first_operation_puts_the_seed(make, puts: list[str], first: str) -> None:
    sb = make()
    if first == "write_file":
        sb.write_file("repo/new.txt", b"new")
    elif first == "read_file":
        assert sb.read_file("repo/a.txt") == b"a\n"
    elif first == "spawn":
        sb.spawn("ls repo > listing", timeout=10)
    else:
        getattr(sb, first)()
    assert puts.count("/work") == 1
    result = sb.exec("git -C repo status --porcelain; cat repo/a.txt; sleep 0.3; cat listing 2>/dev/null | wc -l",
                     timeout=10)
    want_status = "?? new.txt\n" if first == "write_file" else ""
    assert result.stdout == f"{want_status}a\n{'9' if first == 'spawn' else '0'}\n", result.stderr
    assert puts.count("/work") == 1
    sb.settle()  # nothing pending: no-op
    assert puts.count("/work") == 1


def test_settle_before_attach(backend: DockerBackend, docker_client, config: SandboxConfig, make) -> None:
    sb = make()
    other = DockerBackend(docker_client)
    # Unsettled, another handle cannot know the content is still to come.
    assert other.attach(sb.id, config).exec("ls", timeout=10).stdout == ""
    sb.settle()
    assert other.attach(sb.id, config).exec("ls; cat repo/a.txt", timeout=10).stdout == "repo\na\n"


def _race(sb: DockerSandbox, writer: bool) -> list[str]:
    """Three first execs (and a first write_file) started at once; the execs' outputs."""
    results: list[str] = []
    barrier = threading.Barrier(3 + writer)

    def run() -> None:
        barrier.wait()
        results.append(sb.exec("cat repo/a.txt repo/ro/inner", timeout=20).stdout)

    def write() -> None:
        barrier.wait()
        sb.write_file("repo/w.txt", b"w")

    threads = [threading.Thread(target=run) for _ in range(3)] + [threading.Thread(target=write)] * writer
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_first_operations_seed_once(backend: DockerBackend, make, puts: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    streamed: list[bool] = []
    real = backend.api.exec_create

    def exec_create(*args: object, **kwargs: object) -> dict:
        streamed.append(bool(kwargs.get("stdin")))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.api, "exec_create", exec_create)
    for writer in (False, True, False, True):
        sb = make()
        streamed.clear()
        puts.clear()
        assert _race(sb, writer) == ["a\nx\n"] * 3
        # Filled exactly once: by the exec that streamed it, or else by a put.
        assert streamed.count(True) + puts.count("/work") == 1, (streamed, puts)
        if writer:
            assert sb.read_file("repo/w.txt") == b"w"
        else:
            assert streamed.count(True) == 1


def test_a_failed_extraction_raises_and_stays_pending(docker_client, make, puts: list[str]) -> None:
    sb = make()
    docker_client.containers.get(sb.id).exec_run(["chmod", "0555", "/work"], user="1000:1000")
    with pytest.raises(SandboxError, match="(?s)filling the work directory failed.*Permission denied"):
        sb.exec("echo ran > /tmp/ran", timeout=10)
    assert puts == []
    # Still pending: the next operation puts the seed the old way (as root, so it works).
    assert sb.read_file("repo/a.txt") == b"a\n"
    assert puts == ["/work"]
    assert sb.exec("cat /tmp/ran", timeout=10).exit_code == 1, "the command ran after the failure"


def test_a_corrupt_seed_raises_without_hanging(make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sb = make()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(os.urandom(4 << 20))  # beyond any socket buffer: the sender must not hang
    monkeypatch.setattr(sb, "_seed", bad)
    started = time.monotonic()
    with pytest.raises(SandboxError, match="(?s)filling the work directory failed.*extracting the seed failed"):
        sb.exec("true", timeout=30)
    assert time.monotonic() - started < 10
