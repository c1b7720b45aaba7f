"""Every sandbox backend against the one conformance suite (megaflow.sandbox.conformance)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need

from megaflow.errors import SandboxNotFoundError
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.conformance import CHECKS
from megaflow.sandbox.local import LocalBackend
from megaflow.sandbox.memory import MemoryBackend
from megaflow.sandbox.registry import make_backend

REPO = Path(__file__).resolve().parents[1]


def need_bwrap() -> None:
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")


@pytest.fixture
def backend(request, tmp_path):
    if request.param == "memory":
        backend = MemoryBackend()
    else:
        need_bwrap()
        backend = LocalBackend(tmp_path)
    yield backend
    assert backend.list_ids({"conformance": "1"}) == [], "a check left sandboxes behind"


@pytest.mark.parametrize("backend", ["memory", pytest.param("local", marks=pytest.mark.integration)], indirect=True)
@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_conformance(backend, check):
    if backend.name == "memory" and getattr(check, "needs_processes", False):
        pytest.skip("needs real processes")
    check(backend, SandboxConfig(type=backend.name))


@pytest.mark.integration
def test_local_attach_and_destroy_from_another_process(tmp_path):
    need_bwrap()
    backend = LocalBackend(tmp_path)
    sandbox = backend.create(SandboxConfig(), {"run": "r1", "episode": "e1"})
    sandbox.write_file("hello.txt", b"from the parent")
    child = (
        "import json, sys; from pathlib import Path\n"
        "from megaflow.sandbox.base import SandboxConfig\n"
        "from megaflow.sandbox.local import LocalBackend\n"
        "backend = LocalBackend(Path(sys.argv[1]))\n"
        "ids = backend.list_ids({'run': 'r1'})\n"
        "sb = backend.attach(sys.argv[2], SandboxConfig())\n"
        "out = sb.exec('cat hello.txt && echo child > child.txt').stdout\n"
        "print(json.dumps({'ids': ids, 'out': out}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path), sandbox.id],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {"ids": [sandbox.id], "out": "from the parent"}
    assert sandbox.read_file("child.txt") == b"child\n"
    destroy = "import sys; from pathlib import Path; from megaflow.sandbox.local import LocalBackend\n"
    destroy += "LocalBackend(Path(sys.argv[1])).destroy(sys.argv[2])"
    subprocess.run([sys.executable, "-c", destroy, str(tmp_path), sandbox.id], check=True, env=env, timeout=60)
    assert backend.list_ids({"run": "r1"}) == []
    with pytest.raises(SandboxNotFoundError):
        sandbox.exec("true")
    sandbox.close()


def test_local_rejects_ids_that_are_paths(tmp_path):
    backend = LocalBackend(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    backend.destroy("../keep.txt")
    backend.destroy("..")
    assert (tmp_path / "keep.txt").exists()
    with pytest.raises(SandboxNotFoundError):
        backend.attach("../../etc", SandboxConfig())


def test_make_backend(tmp_path):
    assert make_backend("memory").name == "memory"
    local = make_backend("local", root=tmp_path)
    assert local.name == "local" and local.root == tmp_path / "sandboxes"
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        make_backend("vmware")
