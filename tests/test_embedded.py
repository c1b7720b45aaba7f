"""The README's main job: `megaflow run examples/hello.yaml` with no server at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def test_megaflow_run_on_embedded_defaults(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
    env["MEGAFLOW_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-m", "megaflow", "run", "examples/hello.yaml", "--timeout", "240"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("succeeded") >= 6
    assert '"episodes": 6' in out and '"solved": 4' in out
    assert (tmp_path / "data" / "megaflow.sqlite").exists()
    assert (tmp_path / "data" / "broker.sqlite").exists()
