"""Real SWE datasets as they are published: SWE-bench (full, Lite, Verified), SWE-Gym, SWE-rebench.

`read_records` reads a tasks file in any published form: JSONL, JSON, YAML,
Parquet, or a Hugging Face dataset saved to disk (``save_to_disk``). `convert`
turns a record in the published SWE-bench shape into a MegaFlow SWE task:

* ``FAIL_TO_PASS`` / ``PASS_TO_PASS`` given as JSON strings are decoded;
* ``repo`` (``owner/name``) + ``base_commit`` become a git source fetched at build
  time, unless the record names an image (``image``, ``image_name``,
  ``docker_image``) or the selection gives an ``image_template``;
* ``version``, ``environment_setup_commit``, ``hints_text``... are kept in the
  task's ``swebench`` section;
* where the record carries the harness's own test specification (``eval_script``
  and ``log_parser``, as the ``swebench`` package's datasets do), its test command
  (the eval script's lines between the test-output markers, with the environment
  activation before them) and its log parser are used; otherwise the ``swebench``
  parser registered for the repository, and pytest with the test ids.

`select` picks instances (ids, a regular expression, a limit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

#: Record fields naming a prebuilt image, in the order they are looked for.
IMAGE_FIELDS = ("image", "image_name", "docker_image")
#: Fields of a published record kept under the task's ``swebench`` section.
INFO_FIELDS = ("repo", "version", "base_commit", "environment_setup_commit", "created_at", "hints_text")


class Selection(BaseModel):
    """Which instances of a tasks file a run takes (``tasks_select`` in a run spec)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] | None = Field(default=None, description="Only these instance ids (in the file's order).")
    filter: str | None = Field(default=None, description="Only instance ids matching this regular expression.")
    limit: int | None = Field(default=None, ge=1, description="At most this many (after ids and filter).")
    split: str | None = Field(default=None, description="Split of a saved dataset dict (default: test, or the only one).")
    image_template: str | None = Field(
        default=None,
        description="Image per instance, e.g. 'swebench/sweb.eval.x86_64.{docker_id}:latest' ({instance_id}, "
        "{docker_id}: the id with '__' as '_1776_' and lower-cased, {repo}, {version}).")
    workdir: str | None = Field(default=None, description="Work directory in those images (SWE-bench: /testbed).")


def is_hf_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_records(path: Path, split: str | None = None) -> list | None:
    """Records of a Parquet file or saved dataset; None for the other forms (read by `megaflow.spec`)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if is_hf_dataset(path):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("test" if "test" in ds else next(iter(ds)) if len(ds) == 1 else None)
            if name is None or name not in ds:
                raise ValueError(f"{path} holds splits {', '.join(ds)}: pick one (tasks_select.split)")
            ds = ds[name]
        return list(ds)
    return None


def is_published(record) -> bool:
    """A record in the published SWE-bench shape (not a MegaFlow task)."""
    return (isinstance(record, dict) and "kind" not in record and "problem_statement" in record
            and ("base_commit" in record or "FAIL_TO_PASS" in record) and "instance_id" in record)


def _ids(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    return [str(v) for v in value]


def docker_id(instance_id: str) -> str:
    """The instance id as SWE-bench names its per-instance images."""
    return instance_id.replace("__", "_1776_").lower()


def harness_test_command(eval_script: str) -> str | None:
    """The test command of a harness eval script: activation lines, then what runs between the markers.

    Lines before the start marker that set up the environment (``source``, ``conda
    activate``, ``export``) are kept; the rest of the script (resets, patch
    application) is the harness's business, done by MegaFlow's own evaluation.
    """
    from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT

    lines = [line.strip() for line in eval_script.splitlines()]
    starts = [i for i, line in enumerate(lines) if START_TEST_OUTPUT in line]
    ends = [i for i, line in enumerate(lines) if END_TEST_OUTPUT in line]
    if not starts or not ends or ends[0] <= starts[0]:
        return None
    setup = [line for line in lines[:starts[0]]
             if re.match(r"^(source |conda activate |\. |export |cd )", line)]
    body = [line for line in lines[starts[0] + 1:ends[0]] if line and not line.startswith("#")]
    return " && ".join([*setup, *body]) if body else None


def convert(record: dict, selection: Selection | None = None) -> dict:
    """A published record as a MegaFlow SWE task (a dict, validated by `SWETask` later)."""
    selection = selection or Selection()
    iid = str(record["instance_id"])
    info = {k: str(record[k]) for k in INFO_FIELDS if record.get(k) not in (None, "")}
    task = {"kind": "swe", "instance_id": iid, "problem_statement": record["problem_statement"],
            "FAIL_TO_PASS": _ids(record.get("FAIL_TO_PASS")), "PASS_TO_PASS": _ids(record.get("PASS_TO_PASS")),
            "patch": record.get("patch") or "", "test_patch": record.get("test_patch") or ""}
    image = next((record[f] for f in IMAGE_FIELDS if isinstance(record.get(f), str) and record[f]), None)
    if image is None and selection.image_template:
        image = selection.image_template.format(instance_id=iid, docker_id=docker_id(iid),
                                                repo=info.get("repo", ""), version=info.get("version", ""))
    if image:
        task["image"] = image
    elif "repo" in info and "base_commit" in info:
        task["repo"] = f"https://github.com/{info['repo']}.git#{info['base_commit']}"
    if selection.workdir:
        task["workdir"] = selection.workdir
    parser = record.get("log_parser")
    if not parser and info.get("repo"):
        from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY

        found = MAP_REPO_TO_PARSER_PY.get(info["repo"])
        parser = found.__name__ if found is not None else None
    if parser:
        info["log_parser"] = str(parser)
    command = harness_test_command(record["eval_script"]) if record.get("eval_script") else None
    if command:
        task["test_command"] = command
        task["test_args"] = []  # the harness's command names its own test files
    task["swebench"] = info
    return task


def select(records: list, selection: Selection | None) -> list:
    """The records `selection` picks, in file order.

    Raises:
        ValueError: an id of ``ids`` is not in the file.
    """
    if selection is None:
        return records
    out = records
    if selection.ids is not None:
        have = {r.get("instance_id") for r in records if isinstance(r, dict)}
        missing = [i for i in selection.ids if i not in have]
        if missing:
            raise ValueError(f"tasks_select.ids not in the tasks file: {', '.join(missing[:5])}")
        wanted = set(selection.ids)
        out = [r for r in out if r.get("instance_id") in wanted]
    if selection.filter:
        pattern = re.compile(selection.filter)
        out = [r for r in out if pattern.search(str(r.get("instance_id", "")))]
    if selection.limit is not None:
        out = out[:selection.limit]
    return out
