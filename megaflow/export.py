"""Exports of a run's episodes for trainers, benchmarks and other tools.

* ``jsonl``: one episode per line, everything recorded (messages, per-step
  timings, token ids and logprobs).
* ``parquet``: one row per episode in the shape RL trainers read (per-turn prompt
  and completion token ids, a flat ``input_ids`` with its ``loss_mask``, reward,
  advantage, group id); loadable with ``datasets.load_dataset("parquet", ...)``.
* ``swebench``: SWE-bench predictions JSONL (``instance_id``, ``model_name_or_path``,
  ``model_patch``), one per task instance.
* ``minisweagent``: a directory of mini-swe-agent ``*.traj.json`` trajectories.
* ``swebench-report``: a directory of the official harness's ``report.json`` per
  instance (`megaflow.swebench_report`).

Every format carries the grading evidence: ``resolved`` and the FAIL_TO_PASS /
PASS_TO_PASS results (JSONL also the per-test statuses and the test log).

Episodes are read in batches, so a run of any size exports in bounded memory.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from megaflow.agent import transcript
from megaflow.db import states
from megaflow.db.models import Episode, Run, Step, TaskInstance
from megaflow.model.toolcalls import hermes_text, render_prompt
from megaflow.redact import redact
from megaflow.swebench_report import grading_summary

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "swebench", "minisweagent", "swebench-report")
#: Episodes read per database round trip (their steps come in one more).
BATCH = 256
_STEP_FIELDS = ("index", "action", "exit_code", "observation", "finish_reason", "model", "model_version",
                "prompt_tokens", "completion_tokens", "token_ids", "logprobs", "model_s", "exec_s", "agent_s",
                "tool_calls")


class ChatTokenizer(Protocol):
    """Token ids for the parts of a conversation the model backend did not return."""

    def turn_ids(self, history: list[dict], new: list[dict]) -> list[int]:
        """Ids of the `new` messages as the model saw them after `history`, generation prompt included.

        A tokenizer for tool-calling runs also takes ``tools=`` (the tools offered), as
        `HFChatTokenizer` does; it is passed only when the run offered tools.
        """

    def text_ids(self, text: str) -> list[int]:
        """Ids of a completion's text (for backends that return no token ids)."""


class HFChatTokenizer:
    """A `ChatTokenizer` from a Hugging Face tokenizer and its chat template.

    A turn's prompt ids are the difference between the templated conversation
    before the turn and after it: what the chat template adds around the new
    messages, the generation prompt included. What the template writes after a
    completion (an end-of-turn marker) falls in neither; backends that return
    their stop token have it in the completion ids.

    Args:
        name_or_tokenizer: A model name or path for ``AutoTokenizer``, ``smollm2`` (the shipped
            weights), or a tokenizer.

    Raises:
        ImportError: transformers is not installed (the ``model`` extra).
    """

    def __init__(self, name_or_tokenizer):
        if isinstance(name_or_tokenizer, str):
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                raise ImportError("--tokenizer needs transformers: pip install 'megaflow[model]'") from exc
            from megaflow.model.gguf_cache import hf_source

            # `smollm2` (GGUF): its cached converted directory, seconds instead of a conversion.
            name_or_tokenizer = AutoTokenizer.from_pretrained(hf_source(name_or_tokenizer))
        self.tok = name_or_tokenizer

    def _ids(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
        if not messages:
            return []
        # Rendered as the in-process backends render prompts (tools and tool calls included),
        # so the ids are the ones the model saw.
        text = render_prompt(self.tok, messages, tools, add_generation_prompt=generation_prompt)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def turn_ids(self, history: list[dict], new: list[dict], tools: list[dict] | None = None) -> list[int]:
        before = self._ids(history, generation_prompt=False, tools=tools)
        after = self._ids(history + new, generation_prompt=True, tools=tools)
        if after[:len(before)] != before:
            log.warning("chat template is not prefix-stable; a turn's prompt ids hold the whole conversation")
            return after
        return after[len(before):]

    def text_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def export_run(session: Session, run_id: str, fmt: str, path: str | Path, *,
               tokenizer: ChatTokenizer | None = None, model_name: str | None = None) -> int:
    """Write a run's episodes to `path` in format `fmt`.

    Args:
        session: A database session (only read from).
        run_id: The run.
        fmt: One of `FORMATS`.
        path: The output file (a directory for ``minisweagent``).
        tokenizer: For ``parquet``: gives prompt token ids (and completion ids a
            backend did not return). Without it ``prompt_token_ids``, ``input_ids``
            and ``loss_mask`` are null.
        model_name: For ``swebench`` and ``minisweagent``: the model's name;
            defaults to the name the model backend reported.

    Returns:
        How many records (episodes, predictions or trajectories) were written.

    Raises:
        LookupError: no such run.
        ValueError: unknown format.
        ImportError: ``parquet`` without pyarrow installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if session.get(Run, run_id) is None:
        raise LookupError(f"no run {run_id}")
    path = Path(path)
    if fmt in ("minisweagent", "swebench-report"):
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    episodes = iter_episodes(session, run_id)
    if fmt == "jsonl":
        return _write_lines(path, (episode_record(*e) for e in episodes))
    if fmt == "parquet":
        tools = run_tools(session.get(Run, run_id).spec)
        return write_parquet(path, (trainer_row(*e, tokenizer=tokenizer, tools=tools) for e in episodes))
    if fmt == "swebench":
        return _write_lines(path, swebench_predictions(episodes, model_name))
    if fmt == "swebench-report":
        from megaflow.swebench_report import write_reports

        return write_reports(path, episodes)
    return write_trajectories(path, episodes, model_name, agent=session.get(Run, run_id).spec.get("agent"))


def iter_episodes(session: Session, run_id: str, batch: int = BATCH) -> Iterator[tuple[Episode, TaskInstance, list]]:
    """(episode, task instance, steps in index order) for every episode of a run, in submission order."""
    last_seq = None
    while True:
        query = (select(Episode, TaskInstance).join(TaskInstance, TaskInstance.id == Episode.task_instance_id)
                 .where(Episode.run_id == run_id, Episode.superseded_by.is_(None))
                 .order_by(Episode.seq).limit(batch))
        if last_seq is not None:
            query = query.where(Episode.seq > last_seq)
        rows = session.execute(query).all()
        if not rows:
            return
        ids = [ep.id for ep, _ in rows]
        steps: dict[str, list] = {i: [] for i in ids}
        for step in session.execute(select(Step).where(Step.episode_id.in_(ids))
                                    .order_by(Step.episode_id, Step.index)).scalars():
            steps[step.episode_id].append(step)
        for ep, ti in rows:
            yield ep, ti, steps[ep.id]
        last_seq = rows[-1][0].seq
        # Exported rows are never written back: drop them so memory stays bounded.
        session.expunge_all()


def _iso(ts: dt.datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def episode_record(ep: Episode, ti: TaskInstance, steps: list) -> dict:
    """One JSONL line: the episode, its conversation and every step as recorded (credentials masked)."""
    return _masked({
        "episode_id": ep.id, "run_id": ep.run_id, "group_id": ep.group_id, "instance_id": ti.instance_id,
        "task_kind": ti.kind, "sample_index": ep.sample_index, "state": ep.state, "exit_status": ep.exit_status,
        "error": ep.error, "reward": ep.reward, "advantage": ep.advantage, "n_steps": ep.n_steps,
        "format_errors": ep.format_errors, "tokens": ep.tokens, "patch": ep.patch,
        "grading": ep.grading, "test_log": ep.test_log,
        "started_at": _iso(ep.started_at), "finished_at": _iso(ep.finished_at),
        "messages": transcript(steps),
        "steps": [{f: getattr(s, f, None) for f in _STEP_FIELDS} for s in steps],
    })


def _masked(record: dict) -> dict:
    """The record's texts with credential formats masked; numbers (token ids, logprobs) untouched."""
    return redact(record, assignments=False)


def run_tools(spec: dict | None) -> list[dict] | None:
    """The tools a run's scaffold offered its model (None for text scaffolds)."""
    if ((spec or {}).get("agent") or {}).get("type") != "tools":
        return None
    from megaflow.agent.tools import TOOLS

    return TOOLS


def trainer_row(ep: Episode, ti: TaskInstance, steps: list, tokenizer: ChatTokenizer | None = None,
                tools: list[dict] | None = None) -> dict:
    """One Parquet row: per-turn token ids and the flat sequence an RL trainer consumes.

    A turn is a model call. ``input_ids`` concatenates each turn's prompt ids
    (messages added before it, templated) and completion ids; ``loss_mask`` is 1
    on completion tokens only, so observations and prompts are never trained on.
    A turn's prompt ids come from the prompt the backend recorded
    (``steps.prompt_token_ids``: what it adds to the sequence so far), else from
    `tokenizer`; with neither they are None, and so are ``input_ids`` and ``loss_mask``.

    With tool calling, a turn's tool calls are completion tokens (the model wrote
    them: mask 1) and the tool results are prompt tokens of the next turn (mask 0).
    `tools` are those the run offered (`run_tools`), part of every prompt; None:
    the tool scaffold's if any turn made a call.
    """
    turns = [s for s in steps if s.completion is not None]
    if tools is None and any(getattr(s, "tool_calls", None) for s in turns):
        tools = run_tools({"agent": {"type": "tools"}})
    completion_ids: list = []
    prompt_ids: list = []
    history: list[dict] = []
    so_far: list[int] = []
    for s in turns:
        calls = getattr(s, "tool_calls", None)
        ids = s.token_ids
        if ids is None and tokenizer is not None:
            # No ids from the backend: the calls as an in-process model writes them (what its template replays).
            ids = tokenizer.text_ids(hermes_text(s.completion, calls) if calls else s.completion)
        ids = list(ids) if ids is not None else None
        new = [_chat_message(m) for m in s.messages_in or []]
        prompt = recorded_prompt_ids(getattr(s, "prompt_token_ids", None), so_far)
        if prompt is None and tokenizer is not None:
            prompt = tokenizer.turn_ids(history, new, **({"tools": tools} if tools else {}))
        completion_ids.append(ids)
        prompt_ids.append(prompt)
        so_far = so_far + (prompt or []) + (ids or [])
        history = history + new + [{"role": "assistant", "content": s.completion,
                                    **({"tool_calls": calls} if calls else {})}]
    input_ids = loss_mask = None
    if all(p is not None for p in prompt_ids) and all(c is not None for c in completion_ids):
        input_ids, loss_mask = [], []
        for p, c in zip(prompt_ids, completion_ids):
            input_ids += p + c
            loss_mask += [0] * len(p) + [1] * len(c)
    if all(p is None for p in prompt_ids):
        prompt_ids = None
    return {
        "episode_id": ep.id, "run_id": ep.run_id, "group_id": ep.group_id, "instance_id": ti.instance_id,
        "sample_index": ep.sample_index, "state": ep.state, "exit_status": ep.exit_status,
        "reward": ep.reward, "advantage": ep.advantage, "n_turns": len(turns),
        **grading_summary(ep.grading),
        "messages": _masked(transcript(steps)),
        "prompt_token_ids": prompt_ids, "completion_token_ids": completion_ids,
        "completion_logprobs": [list(s.logprobs) if s.logprobs is not None else None for s in turns],
        "model_version": [s.model_version for s in turns],
        "input_ids": input_ids, "loss_mask": loss_mask,
    }


def recorded_prompt_ids(prompt: list[int] | None, so_far: list[int]) -> list[int] | None:
    """What a turn's recorded prompt adds to the episode's sequence so far, or None.

    A backend records the whole prompt it tokenized; in a flat sequence the turn
    contributes only what follows the earlier turns' ids. None when nothing was
    recorded, or when the prompt does not extend the sequence so far (a chat
    template that rewrites earlier turns): then the caller's tokenizer decides.
    """
    if prompt is None:
        return None
    prompt = list(prompt)
    if prompt[:len(so_far)] != so_far:
        log.warning("a recorded prompt does not extend the turns before it; its ids come from the tokenizer")
        return None
    return prompt[len(so_far):]


def _chat_message(m: dict) -> dict:
    """A stored message as a chat template takes it: role and content, and a tool message's call id."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _parquet_schema(pa):
    ints = pa.list_(pa.int64())
    tool_call = pa.struct([("id", pa.string()), ("type", pa.string()),
                           ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    return pa.schema([
        ("episode_id", pa.string()), ("run_id", pa.string()), ("group_id", pa.string()),
        ("instance_id", pa.string()), ("sample_index", pa.int64()), ("state", pa.string()),
        ("exit_status", pa.string()), ("reward", pa.float64()), ("advantage", pa.float64()),
        ("n_turns", pa.int64()), ("resolved", pa.bool_()), ("patch_applied", pa.bool_()),
        ("f2p_failure", pa.list_(pa.string())), ("p2p_failure", pa.list_(pa.string())),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()),
                                         ("tool_calls", pa.list_(tool_call)), ("tool_call_id", pa.string())]))),
        ("prompt_token_ids", pa.list_(ints)), ("completion_token_ids", pa.list_(ints)),
        ("completion_logprobs", pa.list_(pa.list_(pa.float64()))), ("model_version", pa.list_(pa.string())),
        ("input_ids", ints), ("loss_mask", pa.list_(pa.int8())),
    ])


def write_parquet(path: Path, rows: Iterator[dict], batch: int = BATCH) -> int:
    """Write rows with a fixed schema, one row group per `batch` rows.

    Raises:
        ImportError: pyarrow is not installed (the ``export`` extra).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet export needs pyarrow: pip install 'megaflow[export]'") from exc
    schema = _parquet_schema(pa)
    n, chunk = 0, []
    with _atomic(path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                n, chunk = n + len(chunk), []
        if chunk or n == 0:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            n += len(chunk)
    return n


def _model_name(steps: list, model_name: str | None) -> str:
    return model_name or next((s.model for s in steps if s.model), None) or "megaflow"


def swebench_predictions(episodes, model_name: str | None = None) -> Iterator[dict]:
    """One prediction per SWE task instance: its first finished sample's patch.

    SWE-bench keys predictions by instance id, so further samples of an instance
    are left out; episodes that ended in an infra failure or were cancelled are
    skipped in favour of a later sample. Terminal tasks have no patch and are skipped.
    """
    seen: set[str] = set()
    for ep, ti, steps in episodes:
        if ti.kind != "swe" or ep.state not in states.DONE or ti.instance_id in seen:
            continue
        seen.add(ti.instance_id)
        yield {"instance_id": ti.instance_id, "model_name_or_path": _model_name(steps, model_name),
               "model_patch": _masked(ep.patch or "")}


def write_trajectories(out_dir: Path, episodes, model_name: str | None = None, agent: dict | None = None) -> int:
    """mini-swe-agent trajectories laid out as its SWE-bench runner does: ``<id>/<id>.traj.json``.

    `agent` is the run spec's ``agent`` mapping (its mini-swe-agent config is recorded).
    """
    from megaflow.agent.miniswe import to_minisweagent_trajectory

    n = 0
    for ep, ti, steps in episodes:
        name = ti.instance_id.replace("/", "__")
        stem = name if ep.sample_index == 0 else f"{name}.sample{ep.sample_index}"
        target = out_dir / name / f"{stem}.traj.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        traj = to_minisweagent_trajectory(ep, steps, instance_id=ti.instance_id,
                                          model_name=_model_name(steps, model_name), agent=agent)
        traj.setdefault("info", {})["megaflow_grading"] = ep.grading
        target.write_text(json.dumps(_masked(traj), indent=2))
        n += 1
    return n


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary name that becomes `path` on success: a failed export leaves no half file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _write_lines(path: Path, records) -> int:
    n = 0
    with _atomic(path) as tmp, tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n += 1
    return n
