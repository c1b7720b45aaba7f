"""GRPO and GSPO losses against numbers worked out by hand, and their masking."""

from __future__ import annotations

import math

import pytest
import torch

from megaflow.rl.loss import policy_loss, token_logprobs

# Two episodes, four positions each, clip eps 0.2 (ratios kept in [0.8, 1.2]).
#   row 0: [prompt, model, model, observation]   advantage +1
#   row 1: [prompt, prompt, model, model]         advantage -0.5
# Token ratios new/old on the model tokens: row 0: 1.5, 0.9; row 1: 0.5, 1.1.
# The masked positions get wild log-ratios (+-5): they must change nothing.
MASK = [[0, 1, 1, 0], [0, 0, 1, 1]]
RATIOS = [[math.exp(5), 1.5, 0.9, math.exp(-5)], [math.exp(5), math.exp(-5), 0.5, 1.1]]
ADV = [1.0, -0.5]


def _inputs():
    old = torch.tensor([[-1.0, -2.0, -0.7, -3.0], [-0.5, -1.5, -2.5, -0.1]])
    new = (old + torch.log(torch.tensor(RATIOS))).requires_grad_(True)
    return new, old, torch.tensor(MASK, dtype=torch.float32), torch.tensor(ADV)


def test_grpo_by_hand():
    # Token-level: loss_t = -min(r_t A, clip(r_t) A); row = mean over its model tokens.
    #   row 0 (A=+1):   r=1.5 -> min(1.5, 1.2) = 1.2 -> -1.2   (clipped: no gradient)
    #                   r=0.9 -> min(0.9, 0.9) = 0.9 -> -0.9
    #                   row mean -1.05
    #   row 1 (A=-0.5): r=0.5 -> min(-0.25, 0.8*-0.5=-0.4) = -0.4 -> +0.4 (clipped: no gradient)
    #                   r=1.1 -> min(-0.55, -0.55) -> +0.55
    #                   row mean +0.475
    #   loss = (-1.05 + 0.475) / 2 = -0.2875
    # Gradient wrt logp_new of an unclipped token = -A r / (tokens in row) / rows:
    #   row 0 token 2: -1 * 0.9 / 2 / 2 = -0.225;   row 1 token 3: 0.5 * 1.1 / 2 / 2 = 0.1375
    new, old, mask, adv = _inputs()
    loss, stats = policy_loss("grpo", new, old, mask, adv, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.2875, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -0.225, 0.0], [0.0, 0.0, 0.0, 0.1375]])
    assert torch.allclose(new.grad, expected, atol=1e-6), new.grad
    assert stats.tokens == 4
    assert stats.clip_fraction == pytest.approx(0.5)     # 1.5 and 0.5 are outside [0.8, 1.2]
    assert stats.mean_ratio == pytest.approx(1.0)        # (1.5 + 0.9 + 0.5 + 1.1) / 4


def test_gspo_by_hand():
    # Sequence-level: s = exp(mean of the row's token log-ratios) = geometric mean of its ratios.
    #   row 0: s = sqrt(1.5 * 0.9) = sqrt(1.35) = 1.161895 (inside [0.8, 1.2]) -> loss -1.161895
    #   row 1: s = sqrt(0.5 * 1.1) = sqrt(0.55) = 0.741620 (< 0.8, clipped):
    #          min(0.741620 * -0.5, 0.8 * -0.5) = -0.4 -> loss +0.4, no gradient
    #   loss = (-1.161895 + 0.4) / 2 = -0.3809475
    # Gradient on row 0's two model tokens: d(-s)/d logp_t = -s / 2, then / 2 rows = -0.2904738 each.
    new, old, mask, adv = _inputs()
    loss, stats = policy_loss("gspo", new, old, mask, adv, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.3809475, abs=1e-6)
    loss.backward()
    g = math.sqrt(1.35) / 4
    expected = torch.tensor([[0.0, -g, -g, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(new.grad, expected, atol=1e-6), new.grad
    assert stats.clip_fraction == pytest.approx(0.5)     # row 1's two tokens share its clipped ratio


def test_on_policy_both_reduce_to_minus_mean_advantage():
    # ratio 1 everywhere: loss = -mean(A) over rows with model tokens; a row without any counts for nothing.
    old = torch.full((3, 3), -1.0)
    new = old.clone().requires_grad_(True)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([2.0, -1.0, 100.0])
    for algorithm in ("grpo", "gspo"):
        loss, _ = policy_loss(algorithm, new, old, mask, adv)
        assert loss.item() == pytest.approx(-0.5)        # -(2 - 1) / 2


def test_masked_token_logits_get_no_gradient():
    # Logits at position t predict token t+1: those predicting a prompt/observation token,
    # and the last position (predicting nothing), must get exactly zero gradient.
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    mask = torch.tensor([[0, 1, 0, 0, 1]], dtype=torch.float32)   # tokens 1 and 4 are the model's
    logp = token_logprobs(logits, ids)
    old = logp.detach() - 0.05                                    # slightly off-policy, inside the clip
    loss, _ = policy_loss("grpo", logp, old, mask, torch.tensor([1.0]))
    loss.backward()
    grad_norm = logits.grad[0].abs().sum(-1)
    assert grad_norm[0] > 0 and grad_norm[3] > 0                  # predict tokens 1 and 4
    assert grad_norm[1] == 0 and grad_norm[2] == 0 and grad_norm[4] == 0


def test_token_logprobs_by_hand():
    # Uniform logits over 4 tokens: every token has log(1/4); column 0 has no context -> 0.
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)      # position 0: p(token 2) = 3 / (3 + 1 + 1 + 1) = 0.5
    out = token_logprobs(logits, torch.tensor([[0, 2, 1]]))
    assert out[0].tolist() == pytest.approx([0.0, math.log(0.5), math.log(0.25)])


def test_bad_input_is_refused():
    new, old, mask, adv = _inputs()
    with pytest.raises(ValueError, match="unknown algorithm"):
        policy_loss("ppo", new, old, mask, adv)
    with pytest.raises(ValueError, match="shapes disagree"):
        policy_loss("grpo", new, old[:, :3], mask, adv)
