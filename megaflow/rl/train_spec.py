"""The train spec: what `megaflow train SPEC` reads (YAML or JSON), validated in full first."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megaflow.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraSettings(_Strict):
    """A LoRA adapter trained through `peft` instead of the full weights."""

    r: int = Field(default=8, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1, description="Module names the adapter wraps (Llama-style attention by default).")


class TrainSpec(_Strict):
    """One training job: which run feeds it, the algorithm, the weights, where checkpoints go.

    Exactly one of `run` (a run spec to submit; the trainer owns the run) and `run_id`
    (attach to a run already submitted) is given.
    """

    run: str | None = Field(default=None, description="Run spec to submit (path, relative to this file).")
    run_id: str | None = Field(default=None, description="A run already submitted, to consume instead.")
    model: str = Field(default="smollm2", min_length=1,
                       description="Base weights: 'smollm2' (the shipped SmolLM2-135M) or a local model directory. "
                       "Must be what the run's model workers serve, or the ratios mean nothing.")
    algorithm: Literal["grpo", "gspo"] = Field(default="gspo", description="grpo: token-level clipped ratio; "
                                               "gspo: sequence-level ratio (the MegaFlow paper's choice).")
    lora: LoraSettings | None = Field(default=None, description="Train a LoRA adapter; absent: the full weights.")
    lr: float = Field(default=1e-5, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, le=1.0)
    clip_eps: float = Field(default=0.2, gt=0, le=10.0, description="Lower clip: ratio >= 1 - clip_eps.")
    clip_eps_high: float | None = Field(default=None, gt=0, le=10.0, description="Upper clip; None: clip_eps.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient norm clipped to this.")
    micro_batch: int = Field(default=4, ge=1, le=4096, description="Sequences per forward/backward pass.")
    groups_per_batch: int | None = Field(default=None, ge=1, le=1_000_000,
                                         description="Groups per step; None: the run's rl.groups_per_batch, else 1.")
    steps: int | None = Field(default=None, ge=1, description="Stop after this many steps; None: when the run's "
                              "batches end.")
    policy: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$",
                               description="Policy name to publish under; None: the run's rl.policy (a run "
                               "submitted by the trainer gets a fresh one, so it starts from the base weights).")
    output_dir: str = Field(min_length=1, description="Where checkpoints and metrics.jsonl go.")
    batch_timeout_s: float | None = Field(default=None, gt=0, description="Give up when no batch comes this long.")
    seed: int = Field(default=0, description="torch seed (LoRA init).")
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch CPU threads; None: torch's default.")

    @model_validator(mode="after")
    def _one_source(self) -> TrainSpec:
        if (self.run is None) == (self.run_id is None):
            raise ValueError("give exactly one of run (a run spec to submit) and run_id (a run to attach to)")
        return self

    @property
    def kind(self) -> Literal["full", "lora"]:
        return "lora" if self.lora is not None else "full"

    @classmethod
    def load(cls, path: str | Path) -> TrainSpec:
        """Read a train spec; `run` and `output_dir` are taken relative to the spec's folder.

        Raises:
            SpecError: unreadable or invalid, every problem listed.
        """
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"cannot read train spec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise SpecError(f"train spec {path} must be a mapping, got {type(data).__name__}")
        for key in ("run", "output_dir"):
            if isinstance(data.get(key), str):
                data[key] = str(path.parent / Path(data[key]).expanduser())
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: dict, source: str = "train spec") -> TrainSpec:
        """Validate a dict.

        Raises:
            SpecError: one line per problem.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
            raise SpecError(f"invalid {source}: {problems}") from exc
