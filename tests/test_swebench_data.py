"""Published SWE datasets load as they are (issue #15, point 4).

Records in the shapes SWE-bench (full, Lite, Verified), SWE-Gym and SWE-rebench
publish, from JSONL, JSON, Parquet and a saved Hugging Face dataset, with
instances picked by ids, a filter and a limit; the harness's own test command and
log parser are used where a record carries them.
"""

from __future__ import annotations

import json

import pytest
import yaml

from megaflow.envs import grading, swebench_data
from megaflow.errors import SpecError
from megaflow.spec import RunSpec, SWETask

PATCH = "diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
TEST_PATCH = ("diff --git a/tests/test_a.py b/tests/test_a.py\n--- a/tests/test_a.py\n+++ b/tests/test_a.py\n"
              "@@ -1 +1,2 @@\n import a\n+def test_x(): assert a.x == 2\n")
EVAL_SCRIPT = """#!/bin/bash
set -uxo pipefail
source /opt/miniconda3/bin/activate
conda activate testbed
cd /testbed
git checkout abc123 tests/test_a.py
git apply -v - <<'EOF_114329324912'
...
EOF_114329324912
: '>>>>> Start Test Output'
pytest -rA tests/test_a.py
: '>>>>> End Test Output'
git checkout abc123 tests/test_a.py
"""


def lite(i: int, repo: str = "pallets/flask") -> dict:
    """A SWE-bench / Lite / Verified record: test lists as JSON strings."""
    return {"repo": repo, "instance_id": f"{repo.replace('/', '__')}-{i}", "base_commit": "abc123",
            "patch": PATCH, "test_patch": TEST_PATCH, "problem_statement": f"bug {i}", "hints_text": "",
            "created_at": "2023-01-01T00:00:00Z", "version": "2.3", "environment_setup_commit": "def456",
            "FAIL_TO_PASS": json.dumps(["tests/test_a.py::test_x"]),
            "PASS_TO_PASS": json.dumps(["tests/test_a.py::test_y", "tests/test_a.py::test_z[1-2]"])}


def rebench(i: int) -> dict:
    """A SWE-rebench record: lists as lists, an image per instance."""
    r = lite(i, "owner/pkg")
    r.update(FAIL_TO_PASS=["tests/test_a.py::test_x"], PASS_TO_PASS=[], docker_image=f"swerebench/sweb.eval.{i}")
    return r


def harness(i: int) -> dict:
    """A record of the swebench package's own datasets: image, eval script, log parser."""
    r = lite(i, "django/django")
    r.update(image=f"swebench/sweb.eval.x86_64.django_1776_django-{i}:latest", eval_script=EVAL_SCRIPT,
             log_parser="parse_log_django", eval_type="pass_and_fail")
    return r


RECORDS = [lite(1), lite(2), rebench(3), harness(4), lite(5, "sympy/sympy")]


def _spec(tmp_path, tasks_file: str, select: dict | None = None) -> RunSpec:
    spec = {"name": "d", "tasks_file": tasks_file, **({"tasks_select": select} if select else {})}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    return RunSpec.load(tmp_path / "run.yaml")


@pytest.fixture(params=["jsonl", "json", "parquet", "hf"])
def tasks_file(request, tmp_path):
    fmt = request.param
    if fmt == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        return "d.jsonl"
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps(RECORDS))
        return "d.json"
    # Parquet and datasets need one schema: the lists of rebench as JSON strings, as the Hub holds them.
    rows = [{**lite(1), "docker_image": None, "image": None, "eval_script": None, "log_parser": None},
            {**lite(3, "owner/pkg"), "docker_image": "swerebench/sweb.eval.3", "image": None, "eval_script": None,
             "log_parser": None},
            {**harness(4), "docker_image": None}]
    for r in rows:
        r.pop("eval_type", None)
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return "d.parquet"
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    return "hf"


def test_every_published_form_loads(tasks_file, tmp_path):
    tasks = {t.instance_id: t for t in _spec(tmp_path, tasks_file).tasks}
    flask = tasks["pallets__flask-1"]
    assert isinstance(flask, SWETask)
    assert flask.FAIL_TO_PASS == ["tests/test_a.py::test_x"]
    assert flask.PASS_TO_PASS == ["tests/test_a.py::test_y", "tests/test_a.py::test_z[1-2]"]
    assert flask.repo == "https://github.com/pallets/flask.git#abc123" and flask.image is None
    assert flask.swebench["version"] == "2.3" and flask.swebench["environment_setup_commit"] == "def456"
    # The parser swebench registers for the repository (flask's is pytest's own).
    from swebench.harness.log_parsers import PARSER_REGISTRY
    from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY

    assert PARSER_REGISTRY[flask.swebench["log_parser"]] is MAP_REPO_TO_PARSER_PY["pallets/flask"]
    assert flask.patch == PATCH
    if "sympy__sympy-5" in tasks:
        assert grading.log_parser_name(tasks["sympy__sympy-5"]) == "parse_log_sympy"
    assert tasks["owner__pkg-3"].image == "swerebench/sweb.eval.3" and not tasks["owner__pkg-3"].repo
    django = tasks["django__django-4"]
    assert django.image.startswith("swebench/sweb.eval.x86_64.django_1776_django-4")
    assert django.test_command == ("source /opt/miniconda3/bin/activate && conda activate testbed && cd /testbed && "
                                   "pytest -rA tests/test_a.py")
    assert django.test_args == [] and grading.log_parser_name(django) == "parse_log_django"
    from megaflow.envs.swe import tests_command

    assert tests_command(django, django.FAIL_TO_PASS) == django.test_command  # the harness names its own tests


def test_instances_are_picked(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pick = lambda select: [t.instance_id for t in _spec(tmp_path, "d.jsonl", select).tasks]  # noqa: E731
    assert pick({"ids": ["owner__pkg-3", "pallets__flask-1"]}) == ["pallets__flask-1", "owner__pkg-3"]
    assert pick({"filter": "^pallets__"}) == ["pallets__flask-1", "pallets__flask-2"]
    assert pick({"limit": 2}) == ["pallets__flask-1", "pallets__flask-2"]
    assert pick({"filter": "flask|sympy", "limit": 2}) == ["pallets__flask-1", "pallets__flask-2"]
    tasks = _spec(tmp_path, "d.jsonl", {"ids": ["pallets__flask-1"], "workdir": "/testbed",
                                        "image_template": "swebench/sweb.eval.x86_64.{docker_id}:latest"}).tasks
    assert tasks[0].image == "swebench/sweb.eval.x86_64.pallets_1776_flask-1:latest"
    assert tasks[0].workdir == "/testbed"
    with pytest.raises(SpecError, match="not in the tasks file"):
        pick({"ids": ["nope"]})
    with pytest.raises(SpecError, match="tasks_select"):
        pick({"limit": 0})


def test_django_record_is_graded_with_the_django_parser():
    task = SWETask.model_validate(swebench_data.convert({
        **harness(4), "FAIL_TO_PASS": json.dumps(["test_x (a.tests.T)"]),
        "PASS_TO_PASS": json.dumps(["test_y (a.tests.T)"])}))
    log = "test_x (a.tests.T) ... ok\ntest_y (a.tests.T) ... FAIL\n"
    report, statuses = grading.harness_report(log, 1, task, PATCH)
    assert statuses == {"test_x (a.tests.T)": "PASSED", "test_y (a.tests.T)": "FAILED"}
    assert report["resolved"] is False and report["tests_status"]["PASS_TO_PASS"]["failure"] == ["test_y (a.tests.T)"]
    report, _ = grading.harness_report(log.replace("FAIL", "ok"), 0, task, PATCH)
    assert report["resolved"] is True
