"""Clipped policy-gradient losses on recorded token ids: GRPO and GSPO.

Both take per-token tensors of shape ``(B, T)``: one row per episode, its turns laid end
to end (prompt, completion, observation, completion, ...), and

* ``logp_new``: the trained model's log-probability of each recorded token,
* ``logp_old``: the behaviour policy's, as the model worker recorded it,
* ``mask``: 1 on the model's own tokens (completions), 0 on prompt and observation
  tokens and on padding: those get no gradient and do not count in any mean,
* ``advantages``: one number per row (the group advantage), broadcast to its tokens.

GRPO clips the ratio token by token (Shao et al. 2024). GSPO (Zheng et al. 2025, and
the MegaFlow paper) clips one ratio per sequence, the geometric mean of its tokens'
ratios, ``exp(mean over masked tokens of (logp_new - logp_old))``. Conventions follow
TRL's ``GRPOTrainer`` (``importance_sampling_level="token" | "sequence"``,
``loss_type="grpo"``): each row's loss is the mean over its masked tokens, and the batch
loss is the mean over rows that have at least one masked token.

torch is imported here at module level: this module is only imported by trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Algorithm = Literal["grpo", "gspo"]


@dataclass
class LossStats:
    """What one loss evaluation tells a log line (plain floats, detached)."""

    loss: float
    mean_ratio: float
    clip_fraction: float
    tokens: int


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it.

    Args:
        logits: ``(B, T, V)`` from a causal LM run on `input_ids`.
        input_ids: ``(B, T)``.

    Returns:
        ``(B, T)``: column ``t`` is ``log p(input_ids[:, t] | input_ids[:, :t])``; column 0
        has no context and is 0 (it is always a prompt token, masked out).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def policy_loss(
    algorithm: Algorithm,
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped surrogate loss to minimise.

    Args:
        algorithm: ``grpo`` (token-level ratio) or ``gspo`` (sequence-level ratio).
        logp_new, logp_old, mask: ``(B, T)``, see the module docstring.
        advantages: ``(B,)``.
        clip_eps: the ratio is clipped to ``[1 - clip_eps, 1 + clip_eps_high]``.
        clip_eps_high: upper clip; None: `clip_eps`. (GSPO's paper uses tiny values,
            3e-4 / 4e-4, since a sequence ratio moves far less than a token ratio.)

    Returns:
        The scalar loss (differentiable through `logp_new`) and its statistics.

    Raises:
        ValueError: unknown algorithm, or shapes that do not agree.
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape or advantages.shape != logp_new.shape[:1]:
        raise ValueError(
            f"shapes disagree: logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp_new.dtype)
    counts = mask.sum(-1)
    # A masked-out position's old logprob may be anything (0, NaN from a missing value):
    # zero it before it reaches exp(), so it cannot poison the gradient through a product with 0.
    log_ratio = torch.where(mask > 0, logp_new - logp_old.to(logp_new.dtype), torch.zeros_like(logp_new))
    if algorithm == "grpo":
        log_weight = log_ratio
    elif algorithm == "gspo":
        log_weight = ((log_ratio * mask).sum(-1) / counts.clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}: grpo or gspo")
    ratio = torch.exp(log_weight)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    adv = advantages.to(logp_new.dtype).unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T) or (B, 1)
    per_token = per_token.expand_as(logp_new)
    per_row = (per_token * mask).sum(-1) / counts.clamp(min=1.0)
    rows = counts > 0
    loss = per_row[rows].mean() if bool(rows.any()) else (logp_new * 0.0).sum()
    with torch.no_grad():
        ratio_tokens = ratio.expand_as(logp_new)
        was_clipped = ((ratio_tokens < 1.0 - clip_eps) | (ratio_tokens > 1.0 + high)).to(mask.dtype)
        n = float(mask.sum())
        stats = LossStats(
            loss=float(loss),
            mean_ratio=float((ratio_tokens * mask).sum() / max(n, 1.0)),
            clip_fraction=float((was_clipped * mask).sum() / max(n, 1.0)),
            tokens=int(n),
        )
    return loss, stats
