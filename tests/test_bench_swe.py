"""`megaflow bench swe` (issue #15, point 7): MegaFlow beside a plain harness on the same instances and images."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from conftest import need, run_megaflow

from megaflow.errors import SandboxError


@pytest.mark.integration
def test_bench_swe_reports_rates_ratio_and_phases(tmp_path):
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image
    from megaflow.sandbox.contexts import context_dir

    try:
        import docker

        url = ensure_dockerd(os.environ.get("MEGAFLOW_DOCKERD_DIR",
                                            os.path.join(tempfile.gettempdir(), "megaflow-dockerd")))
        client = docker.DockerClient(base_url=url)
        build_base(client)
        build_image(client, context_dir("python"), "megaflow/python")
    except SandboxError as exc:
        need("a Docker engine with megaflow/base and megaflow/python", False, str(exc))
    proc = run_megaflow(["bench", "swe", "--json", "--concurrency", "2", "--rollouts", "1", "--tasks",
                         "examples/tasks/swe.yaml"],
                        tmp_path / "data", timeout=900, extra_env={"DOCKER_HOST": url})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    n = figures["instances"]
    assert n >= 10 and figures["megaflow_resolved"] == n and figures["plain_passed"] == n, figures
    assert figures["swe_instances_per_h"] > 0 and figures["plain_instances_per_h"] > 0
    assert figures["ratio_to_plain_harness"] == pytest.approx(
        figures["swe_instances_per_h"] / figures["plain_instances_per_h"], rel=0.01)
    for phase in ("provision", "agent", "tests", "teardown"):
        assert figures[f"p50_{phase}_s"] is not None and figures[f"p50_{phase}_s"] >= 0, figures
    assert 0 < figures["submit_s_per_run"] < figures["megaflow_s"], figures


def test_the_plain_harness_takes_the_instances_in_megaflows_admission_order():
    from megaflow.bench.swe import admission_order

    assert admission_order(["a", "b", "c"], 2) == ["a", "a", "b", "b", "c", "c"]
