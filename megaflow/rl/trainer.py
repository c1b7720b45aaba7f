"""The reference trainer: batches in, clipped policy-gradient step, new policy published.

`megaflow train SPEC` runs `train()`: it submits the run (or attaches to one), then for
each batch of complete groups (``client.batches``) computes GRPO or GSPO on the
recorded token ids against the recorded behaviour logprobs, steps AdamW, saves the
policy (a LoRA adapter directory, or a full state-dict file), publishes it
(``client.publish_policy``) and acknowledges the batch, so a batch is used once even
if the trainer dies between steps. It is a plain consumer of the client: any other
trainer can take its place (docs/rl.md, "Trainer").

Behaviour logprobs are the raw model distribution (temperature 1, before top_p), as
the model workers record them, so the new logprobs are computed the same way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megaflow.rl.train_spec import TrainSpec

logger = logging.getLogger(__name__)

#: Full-weight checkpoints are big (540 MB for SmolLM2-135M): keep this many, newest last.
#: Older ones are gone once every worker has moved past them (the staleness bound is small).
KEEP_FULL_CHECKPOINTS = 3

#: Tries of one database operation while the server refuses connections.
DB_ATTEMPTS = 8


@dataclass
class StepLog:
    """One training step, as logged and kept in the policy version's meta."""

    step: int
    policy_version: int
    sampled_versions: list[int]
    episodes: int
    loss: float
    mean_reward: float
    format_error_rate: float
    clip_fraction: float
    mean_ratio: float
    rollout_s: float
    train_s: float
    sync_s: float


class Learner:
    """A causal LM with its tokenizer and optimizer, stepped on batches.

    Args:
        spec: The train spec (model, LoRA or full, optimiser settings, algorithm).
        model: An already-loaded model to train instead of loading ``spec.model``
            (benchmarks and tests share one).
    """

    def __init__(self, spec: TrainSpec, model: Any = None):
        import torch

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        self.model = model if model is not None else load_model(spec.model)
        if spec.lora is not None:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(
                r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM"))
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        self._saved: list[Path] = []

    def step(self, episodes: list) -> Any:
        """One optimizer step on `episodes` (`TrainEpisode`s); returns the `LossStats` of the batch.

        The batch loss is the mean over episodes of each one's mean over its model tokens
        (TRL's ``loss_type="grpo"``), accumulated over micro-batches. The statistics'
        ratio, clip fraction and tokens are over the episodes with a non-zero advantage.

        Raises:
            ValueError: an episode has no behaviour logprobs, or they do not line up.
        """
        import torch

        from megaflow.rl.loss import LossStats, policy_loss, token_logprobs

        rows = [e for e in episodes if any(e.loss_mask)]
        for e in rows:
            if e.behaviour_logprobs is None or len(e.behaviour_logprobs) != len(e.input_ids):
                raise ValueError(f"episode {e.episode_id}: no behaviour logprobs aligned with its tokens "
                                 "(the model backend must record logprobs)")
        self.optimizer.zero_grad(set_to_none=True)
        total = LossStats(loss=0.0, mean_ratio=0.0, clip_fraction=0.0, tokens=0)
        # A row with advantage 0 adds exactly 0 to the loss and to every gradient (there is
        # no KL term): skip its forward and backward, but keep it in the mean's denominator.
        # A batch of groups that all scored alike therefore costs nothing and moves nothing.
        active = [e for e in rows if e.advantage != 0]
        for start in range(0, len(active), self.spec.micro_batch):
            chunk = active[start:start + self.spec.micro_batch]
            ids, mask, old, attention = self._pad(chunk)
            adv = torch.tensor([e.advantage for e in chunk], dtype=torch.float32)
            logits = self.model(input_ids=ids, attention_mask=attention).logits
            loss, stats = policy_loss(self.spec.algorithm, token_logprobs(logits, ids), old, mask, adv,
                                      clip_eps=self.spec.clip_eps, clip_eps_high=self.spec.clip_eps_high)
            # policy_loss averages over this chunk's rows; weight it by its share of the batch.
            (loss * len(chunk) / len(rows)).backward()
            total.loss += stats.loss * len(chunk) / len(rows)
            total.mean_ratio += stats.mean_ratio * stats.tokens
            total.clip_fraction += stats.clip_fraction * stats.tokens
            total.tokens += stats.tokens
        if active:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.spec.max_grad_norm)
            self.optimizer.step()
        if total.tokens:
            total.mean_ratio /= total.tokens
            total.clip_fraction /= total.tokens
        return total

    def _pad(self, chunk: list):
        import torch

        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width))
        old = torch.zeros((len(chunk), width))
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            mask[i, :n] = torch.tensor(e.loss_mask, dtype=torch.float32)
            old[i, :n] = torch.tensor(e.behaviour_logprobs, dtype=torch.float32)
            attention[i, :n] = 1
        return ids, mask, old, attention

    def save(self, step: int) -> tuple[str, str]:
        """Write the current policy under ``output_dir``; returns ``(path, kind)`` for publish_policy."""
        import torch

        out = Path(self.spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.spec.lora is not None:
            path = out / f"step-{step:05d}"
            self.model.save_pretrained(str(path))  # the adapter only: a few MB
            return str(path), "lora"
        path = out / f"step-{step:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp)
        os.replace(tmp, path)  # a worker never sees half a file
        self._saved.append(path)
        while len(self._saved) > KEEP_FULL_CHECKPOINTS:
            old = self._saved.pop(0)
            old.unlink(missing_ok=True)
        return str(path), "full"


def load_model(name: str) -> Any:
    """The base causal LM, from local files only, in float32 on CPU (GGUF weights are dequantized)."""
    from transformers import AutoModelForCausalLM

    from megaflow.model.gguf_cache import hf_source

    # `smollm2`: the GGUF's cached converted directory (converted once per machine).
    model = AutoModelForCausalLM.from_pretrained(hf_source(name), local_files_only=True)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def format_error_rate(session_factory: Callable, episode_ids: list[str], turns: int) -> float:
    """Share of the episodes' model turns that the scaffold could not parse into an action."""
    from sqlalchemy import func, select

    from megaflow.db.models import Episode

    if not episode_ids or not turns:
        return 0.0
    with session_factory() as s:
        errors = s.execute(select(func.coalesce(func.sum(Episode.format_errors), 0))
                           .where(Episode.id.in_(episode_ids))).scalar_one()
    return float(errors) / turns


def prepare_run(spec: TrainSpec, client: Any) -> tuple[str, int]:
    """Submit the spec's run (a fresh policy name, so generation starts from the base weights) or attach.

    Returns:
        ``(run_id, groups_per_batch)``.
    """
    from megaflow.spec import RunSpec

    if spec.run_id is not None:
        with client.session() as s:
            from megaflow.db.models import Run

            run = s.get(Run, spec.run_id)
            if run is None:
                raise LookupError(f"no run {spec.run_id}")
            rl = RunSpec.model_validate(run.spec).rl
        return spec.run_id, spec.groups_per_batch or (rl.groups_per_batch if rl else 1)
    run = RunSpec.load(spec.run)
    data = run.model_dump(mode="json", exclude_none=True)
    rl = dict(data.get("rl") or {})
    rl["policy"] = spec.policy or f"{run.name}-{int(time.time())}"
    if spec.groups_per_batch is not None:
        rl["groups_per_batch"] = spec.groups_per_batch
    data["rl"] = rl
    run = RunSpec.parse(data, source=spec.run)
    return client.submit(run), run.rl.groups_per_batch


def train(spec: TrainSpec, client: Any, learner: Learner | None = None,
          on_step: Callable[[StepLog], None] | None = None, tokenizer: Any = None) -> list[StepLog]:
    """Consume the run's batches until ``spec.steps`` or the run's end; one policy version per step.

    Args:
        spec: The train spec.
        client: A `megaflow.Client` (or anything with ``submit``, ``session``, ``batches``,
            ``publish_policy``).
        learner: A ready learner (benchmarks share one); None: built from `spec`.
        on_step: Called after each step (the CLI prints it).
        tokenizer: For backends that record no token ids (``client.batches``).

    Returns:
        One `StepLog` per step, also appended to ``output_dir/metrics.jsonl``.
    """
    run_id, groups = prepare_run(spec, client)
    learner = learner or Learner(spec)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_id").write_text(run_id + "\n")
    logs: list[StepLog] = []
    stream = _retrying("opening the batch stream", lambda: client.batches(
        run_id, groups_per_batch=groups, tokenizer=tokenizer, timeout_s=spec.batch_timeout_s))
    try:
        waited = time.monotonic()
        for batch in stream:
            got = time.monotonic()
            log = _step(spec, client, learner, batch, run_id, len(logs) + 1, rollout_s=got - waited)
            logs.append(log)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(asdict(log)) + "\n")
            if on_step:
                on_step(log)
            waited = time.monotonic()
            if spec.steps is not None and len(logs) >= spec.steps:
                break
    finally:
        stream.close()
    return logs


def _step(spec: TrainSpec, client: Any, learner: Learner, batch: Any, run_id: str, step: int,
          rollout_s: float) -> StepLog:
    started = time.monotonic()
    stats = learner.step(batch.episodes)
    trained = time.monotonic()
    episodes = batch.episodes
    turns = sum(len(e.completion_token_ids) for e in episodes)
    rewards = [e.reward for e in episodes]
    sampled = sorted({v or 0 for e in episodes for v in e.policy_versions})
    log = StepLog(
        step=step, policy_version=0, sampled_versions=sampled, episodes=len(episodes), loss=stats.loss,
        mean_reward=sum(rewards) / len(rewards) if rewards else 0.0,
        format_error_rate=_retrying("reading format errors", lambda: format_error_rate(
            client.session, [e.episode_id for e in episodes], turns)),
        clip_fraction=stats.clip_fraction, mean_ratio=stats.mean_ratio,
        rollout_s=rollout_s, train_s=trained - started, sync_s=0.0)
    path, kind = learner.save(step)
    log.policy_version = _retrying("publishing", lambda: client.publish_policy(path, kind=kind, run_id=run_id,
                                                                              meta=_meta(log)))
    batch.ack()  # after publishing: a trainer killed before this point gives the batch to the next one
    log.sync_s = time.monotonic() - trained
    logger.info("step %d: %s", step, asdict(log))
    return log


def _retrying(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, retried with backoff while the database refuses connections (a busy shared server).

    Used for publishing: a failure after the version was recorded (in the admission that
    follows it) makes the retry record one more version of the same checkpoint, harmless
    to the workers and better than a trainer that dies and leaves the run waiting for it.
    """
    from sqlalchemy.exc import OperationalError

    for attempt in range(DB_ATTEMPTS):
        try:
            return fn()
        except OperationalError as exc:
            if attempt == DB_ATTEMPTS - 1:
                raise
            logger.warning("%s failed (%s); retrying", what, type(exc).__name__)
            time.sleep(min(30.0, 2.0 ** attempt))
    raise AssertionError("unreachable")


def _meta(log: StepLog) -> dict:
    return {k: v for k, v in asdict(log).items() if k not in ("policy_version", "sync_s")}

