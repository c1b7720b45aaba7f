"""`megaflow bench rl`: how long the trainer waits for rollouts, in sync and async mode.

The same small training runs three times on real workers (RabbitMQ, PostgreSQL,
Celery): ``rl.mode: sync``, then ``async`` with ``max_staleness`` 1 and 2. Rollouts
come from the scripted model (its latency set so that sampling a batch takes about
as long as a training step); each step is the real trainer's (`megaflow.rl.trainer`):
GSPO with a LoRA adapter on SmolLM2-135M on CPU (``model="tiny"``: a 2-layer Llama with
SmolLM2's vocabulary, for the bench's own test), saved and published as a policy
version that the scripted model workers switch to.

Figures, per mode: the trainer's idle fraction (seconds waiting for a batch over
the wall time of the steps), and per step the rollout wait, train and weight-sync
(save + publish + ack) seconds. The floor beside them, from the same run: the idle
fraction a perfect pipeline would have with the measured rollout time R and train
time T: sync R / (R + T), async max(0, R - T) / max(R, T). The first batch's wait
(the pipeline filling, the same in every mode) is left out of the idle fraction and
reported apart, as it vanishes over a training of many steps.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from megaflow.bench.floors import wait_for_worker
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess
from megaflow.rl.train_spec import TrainSpec
from megaflow.rl.trainer import Learner, load_model, train

#: Modes timed: (figure suffix, rl settings).
MODES = (("sync", {"mode": "sync"}), ("async1", {"mode": "async", "max_staleness": 1}),
         ("async2", {"mode": "async", "max_staleness": 2}))

REPLIES = ["I will make the file.\n```bash\ntouch out.txt\n```", "Done.\n```bash\nsubmit\n```"]


def run_spec(mode: dict, policy: str, steps: int, groups: int, rollouts: int, latency_s: float) -> dict:
    return {
        "name": f"bench-rl-{policy}",
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": REPLIES, "latency_s": latency_s},
        "sandbox": {"type": "memory"},
        "limits": {"max_steps": 4},
        "rl": {**mode, "policy": policy, "groups_per_batch": groups},
        "tasks": [{"instance_id": f"t{i}", "instruction": "Create out.txt, then submit.", "check": "true"}
                  for i in range(steps * groups)],
    }


def tiny_model(vocab: int) -> Any:
    """A 2-layer Llama: a real transformers model whose step takes milliseconds (the bench's test)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                        pad_token_id=0))


class SignalLearner(Learner):
    """The real trainer step, on batches given a signal.

    Every scripted episode scores alike, so every advantage is 0, and the trainer
    rightly skips such episodes. To time the step of a batch that does carry signal,
    the episodes get advantages +1 and -1 in turn (a copy; the recorded rows are untouched).
    """

    def step(self, episodes: list) -> Any:
        signed = [dataclasses.replace(e, advantage=1.0 if i % 2 == 0 else -1.0) for i, e in enumerate(episodes)]
        return super().step(signed)


def _tokenizer() -> Any:
    from megaflow.export import HFChatTokenizer

    return HFChatTokenizer("smollm2")


def run_rl_bench(steps: int = 5, groups: int = 1, rollouts: int = 4, model: str = "smollm2",
                 latency_s: float | None = None, settings: Settings | None = None) -> dict:
    """Time the three modes; returns the figures.

    Args:
        steps: Training steps per mode (batches).
        groups, rollouts: Groups per batch and episodes per group.
        model: ``smollm2`` or ``tiny``.
        latency_s: Scripted latency per model call; None: calibrated so a batch's two
            turns take about one measured train step.
    """
    settings = settings or Settings()
    if settings.embedded:
        raise SystemExit("bench rl needs PostgreSQL and a broker: set MEGAFLOW_DATABASE_URL and MEGAFLOW_BROKER_URL")
    out = Path(tempfile.mkdtemp(prefix="megaflow-bench-rl-"))
    settings = settings.model_copy(update={"data_dir": out / "stack"})
    upgrade(settings.resolved_database_url())
    tokenizer = _tokenizer()
    base = load_model("smollm2") if model == "smollm2" else tiny_model(len(tokenizer.tok))
    spec = TrainSpec.parse({"run_id": "-", "output_dir": str(out), "algorithm": "gspo", "lora": {"r": 8, "alpha": 16},
                            "lr": 1e-5, "micro_batch": 4, "batch_timeout_s": 600})
    learner = SignalLearner(spec, model=base)
    figures: dict = {"model": model, "steps": steps, "episodes_per_step": groups * rollouts}
    prefix = f"bench-rl-{uuid.uuid4().hex[:4]}-"
    workers = [WorkerProcess(p, settings, name=f"{prefix}{p}").start() for p in ("model", "agent", "env")]
    try:
        client = Client(settings)
        for w in workers:
            wait_for_worker(client.app, w.name)
        if latency_s is None:
            latency_s = _calibrate(learner, client, spec, groups, rollouts, tokenizer)
        figures["scripted_latency_s"] = round(latency_s, 3)
        for name, mode in MODES:
            figures.update(_time_mode(name, mode, learner, client, spec, steps, groups, rollouts, latency_s, tokenizer))
    finally:
        for w in workers:
            w.stop()
    figures["async1_over_sync"] = round(figures["trainer_idle_fraction_async1"]
                                        / max(figures["trainer_idle_fraction_sync"], 1e-9), 3)
    return figures


def _calibrate(learner: SignalLearner, client: Client, spec: TrainSpec, groups: int, rollouts: int, tokenizer) -> float:
    """One zero-latency batch, trained on twice (the first step warms up): half the train time per turn."""
    policy = f"cal-{uuid.uuid4().hex[:6]}"
    run = run_spec({"mode": "async"}, policy, 1, groups, rollouts, 0.0)
    run_id = client.submit(run)
    with client.batches(run_id, groups_per_batch=groups, tokenizer=tokenizer, timeout_s=600) as stream:
        batch = next(iter(stream))
        learner.step(batch.episodes)
        started = time.monotonic()
        learner.step(batch.episodes)
        train_s = time.monotonic() - started
        batch.ack()
    return train_s / len(REPLIES)


def _time_mode(name: str, mode: dict, learner: Learner, client: Client, spec: TrainSpec, steps: int, groups: int,
               rollouts: int, latency_s: float, tokenizer) -> dict:
    policy = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    path = Path(spec.output_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    run = path / "run.json"
    run.write_text(json.dumps(run_spec(mode, policy, steps, groups, rollouts, latency_s)))
    mode_spec = spec.model_copy(update={"run": str(run), "run_id": None, "output_dir": str(path), "steps": steps})
    started = time.monotonic()
    logs = train(mode_spec, client, learner=learner, tokenizer=tokenizer)
    wall = time.monotonic() - started
    fill = logs[0].rollout_s
    steady_wall = wall - fill
    waits = [log.rollout_s for log in logs[1:]]
    rollout = statistics.mean(waits) if name == "sync" and waits else None
    train_s = statistics.mean(log.train_s for log in logs)
    sync_s = statistics.mean(log.sync_s for log in logs)
    out = {
        f"trainer_idle_fraction_{name}": round(sum(waits) / steady_wall, 3) if steady_wall > 0 else 0.0,
        f"trainer_idle_fraction_with_fill_{name}": round(sum(log.rollout_s for log in logs) / wall, 3),
        f"first_batch_s_{name}": round(fill, 3),
        f"rollout_wait_s_per_step_{name}": round(statistics.mean(waits), 3) if waits else 0.0,
        f"train_s_per_step_{name}": round(train_s, 3),
        f"weight_sync_s_per_step_{name}": round(sync_s, 3),
        f"policy_versions_sampled_{name}": sorted({v for log in logs for v in log.sampled_versions}),
    }
    if rollout is not None:
        # In sync mode the wait for a batch is the whole rollout of it: R; the floors follow.
        out["rollout_s_per_step"] = round(rollout, 3)
        out["ideal_idle_fraction_sync"] = round(rollout / (rollout + train_s + sync_s), 3)
        out["ideal_idle_fraction_async"] = round(max(0.0, rollout - train_s - sync_s) / max(rollout, train_s + sync_s),
                                                 3)
    return out
