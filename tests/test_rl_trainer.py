"""The reference trainer without services: its spec, one learning step, and checkpoints
that the model workers' loader (`megaflow.model.weights.load_transformers`) takes.

A tiny randomly initialised Llama stands in for SmolLM2 (same architecture, seconds
not minutes); the end-to-end run with workers is in test_rl_trainer_loop.py.
"""

from __future__ import annotations

import pytest
import torch

from megaflow.errors import SpecError
from megaflow.model.policy import PolicyRef
from megaflow.model.weights import load_transformers
from megaflow.rl.batches import TrainEpisode
from megaflow.rl.train_spec import TrainSpec
from megaflow.rl.trainer import Learner


def tiny_llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config)


def episode(ids, mask, advantage, old=None, name="e"):
    old = old if old is not None else [0.0] * len(ids)
    return TrainEpisode(episode_id=name, group_id="g", instance_id="t", sample_index=0, exit_status="submitted",
                        reward=advantage, advantage=advantage, prompt_token_ids=[], completion_token_ids=[],
                        completion_logprobs=[], policy_versions=[None], input_ids=ids, loss_mask=mask,
                        behaviour_logprobs=old)


def on_policy(model, ids, mask, advantage, name):
    """An episode whose behaviour logprobs are the model's own (ratio 1)."""
    from megaflow.rl.loss import token_logprobs

    with torch.no_grad():
        logp = token_logprobs(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids]))[0]
    return episode(ids, mask, advantage, old=(logp * torch.tensor(mask)).tolist(), name=name)


def spec(tmp_path, **kw) -> TrainSpec:
    return TrainSpec.parse({"run_id": "r", "output_dir": str(tmp_path / "out"), "lr": 0.05, "threads": 1, **kw})


@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_a_step_makes_the_rewarded_completion_likelier(tmp_path, algorithm, lora):
    model = tiny_llama()
    good, bad = [5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12, 13]
    mask = [0, 0, 0, 1, 1, 1]
    learner = Learner(spec(tmp_path, algorithm=algorithm, lora=lora), model=model)
    before = _seq_logp(learner.model, good, mask) - _seq_logp(learner.model, bad, mask)
    for _ in range(3):
        batch = [on_policy(learner.model, good, mask, 1.0, "g"), on_policy(learner.model, bad, mask, -1.0, "b")]
        stats = learner.step(batch)
    after = _seq_logp(learner.model, good, mask) - _seq_logp(learner.model, bad, mask)
    assert after > before + 0.1
    assert stats.tokens == 6


def test_prompt_tokens_are_not_trained(tmp_path):
    # Only prompt tokens differ between the two rows' targets: with every model token
    # masked out there is nothing to learn and the weights must not move.
    model = tiny_llama()
    learner = Learner(spec(tmp_path), model=model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    learner.step([episode([5, 6, 7], [0, 0, 0], 1.0), episode([5, 8, 9], [0, 0, 0], -1.0)])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_an_episode_without_behaviour_logprobs_is_refused(tmp_path):
    learner = Learner(spec(tmp_path), model=tiny_llama())
    bad = episode([5, 6, 7], [0, 1, 1], 1.0)
    bad.behaviour_logprobs = None
    with pytest.raises(ValueError, match="behaviour logprobs"):
        learner.step([bad])


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_saved_policy_loads_in_a_model_worker(tmp_path, lora):
    """What the trainer saves is what `load_transformers` (the transformers backend's swap) reads."""
    base = tiny_llama()
    learner = Learner(spec(tmp_path, lora=lora), model=tiny_llama())
    ids, mask = [5, 6, 7, 8], [0, 1, 1, 1]
    learner.step([on_policy(learner.model, ids, mask, 1.0, "a"), on_policy(learner.model, [5, 6, 9, 9], mask, -1.0, "b")])
    path, kind = learner.save(1)
    assert kind == ("lora" if lora else "full")
    loaded = load_transformers(base, PolicyRef(policy="p", version=1, path=path, kind=kind), "cpu")
    learner.model.eval()
    with torch.no_grad():
        want = learner.model(input_ids=torch.tensor([ids])).logits
        got = loaded(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(base(input_ids=torch.tensor([ids])).logits, got, atol=1e-5)


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="exactly one of run") as exc:
        TrainSpec.parse({"output_dir": "x"})
    assert "\n" not in str(exc.value)
    with pytest.raises(SpecError, match="algorithm"):
        TrainSpec.parse({"run_id": "r", "output_dir": "x", "algorithm": "ppo"})
    bad = tmp_path / "t.yaml"
    bad.write_text("run_id: r\noutput_dir: out\nlr: -1\n")
    with pytest.raises(SpecError, match="lr"):
        TrainSpec.load(bad)
    good = tmp_path / "g.yaml"
    good.write_text("run: run.yaml\noutput_dir: out\nlora: {r: 4}\n")
    loaded = TrainSpec.load(good)
    assert loaded.run == str(tmp_path / "run.yaml") and loaded.output_dir == str(tmp_path / "out")
    assert loaded.kind == "lora" and loaded.algorithm == "gspo"


def _seq_logp(model, ids, mask) -> float:
    from megaflow.rl.loss import token_logprobs

    with torch.no_grad():
        logp = token_logprobs(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids]))[0]
    return float((logp * torch.tensor(mask, dtype=torch.float32)).sum())


def test_the_readme_bare_trainer_is_a_plain_consumer(tmp_path):
    """docs/examples/bare_trainer.py, fed by a stand-in for client.batches: it steps, publishes, acks."""
    import importlib.util
    from pathlib import Path

    from megaflow.rl.batches import Batch

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "bare_trainer.py"
    module_spec = importlib.util.spec_from_file_location("docs_example_bare_trainer", path)
    example = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(example)

    model = tiny_llama()
    acks, published = [], []
    good, bad, mask = [5, 6, 7, 8], [5, 6, 9, 9], [0, 0, 1, 1]

    class Stand:  # what client.batches and client.publish_policy look like to a trainer
        def batches(self, run_id, groups_per_batch):
            import contextlib

            batches = [Batch(run_id=run_id, batch_id=f"b{i}", group_ids=["g"], _ack=lambda i=i: acks.append(i),
                             episodes=[on_policy(model, good, mask, 1.0, "g"), on_policy(model, bad, mask, -1.0, "b")])
                       for i in range(3)]
            return contextlib.nullcontext(iter(batches))

        def publish_policy(self, path, kind, run_id):
            published.append((Path(path).name, kind, run_id))
            return len(published)

    before = _seq_logp(model, good, mask) - _seq_logp(model, bad, mask)
    example.train(Stand(), "run-1", model, torch.optim.SGD(model.parameters(), lr=0.5), str(tmp_path))
    assert acks == [0, 1, 2]
    assert published == [(f"step-{i}.pt", "full", "run-1") for i in (1, 2, 3)]
    assert _seq_logp(model, good, mask) - _seq_logp(model, bad, mask) > before


def test_the_run_report_plots_the_training(sqlite_url, tmp_path):
    """Each published version's meta (what `train` publishes) becomes the report's Training plot and table."""
    from megaflow.db.engine import session_scope
    from megaflow.db.models import PolicyVersion, Run
    from megaflow.ops.report import write_report

    with session_scope(sqlite_url) as s:
        s.add(Run(id="r1", name="touch", spec={"rl": {"policy": "p-1"}}))
        s.add(PolicyVersion(policy="other", version=1, path="/x", kind="lora", meta={"step": 9}))
        for v, (reward, errors) in enumerate([(-0.5, 0.75), (-0.25, 0.5), (0.5, 0.125)], 1):
            s.add(PolicyVersion(policy="p-1", version=v, path=f"/ckpt/{v}", kind="lora",
                                meta={"step": v, "mean_reward": reward, "format_error_rate": errors, "loss": 0.1,
                                      "episodes": 8, "sampled_versions": [v - 1]}))
    with session_scope(sqlite_url) as s:
        write_report(s, "r1", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Training</h2>" in page and "alt='Training'" in page
    assert "<td>+0.500</td><td>12%</td>" in page       # step 3's row: reward, format-error rate
    assert page.count("<td>8</td>") == 3               # three steps of p-1, none of "other"


def test_a_batch_without_signal_moves_nothing(tmp_path):
    """Groups that all scored alike have advantage 0: no gradient, so no forward pass and no update."""
    model = tiny_llama()
    learner = Learner(spec(tmp_path), model=model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    stats = learner.step([episode([5, 6, 7], [0, 1, 1], 0.0), episode([5, 8, 9], [0, 1, 1], 0.0)])
    assert stats.tokens == 0 and stats.loss == 0.0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_megaflow_train_refuses_a_bad_spec_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from megaflow.cli.main import app

    bad = tmp_path / "train.yaml"
    bad.write_text("run: run.yaml\noutput_dir: out\nalgorithm: ppo\n")
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "algorithm" in result.output and len(result.output.strip().splitlines()) == 1
