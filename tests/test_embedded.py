"""The README's main job: `megaflow run examples/hello.yaml` with no server at all."""

from __future__ import annotations

import shutil

from conftest import need, run_megaflow


def test_megaflow_run_on_embedded_defaults(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    proc = run_megaflow(["run", "examples/hello.yaml", "--timeout", "240"], tmp_path / "data", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("succeeded") >= 6
    assert '"episodes": 6' in out and '"solved": 4' in out
    assert (tmp_path / "data" / "megaflow.sqlite").exists()
    assert (tmp_path / "data" / "broker.sqlite").exists()
