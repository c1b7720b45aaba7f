"""Real weights switching (issue 18, point 2): SmolLM2-135M in the transformers backend
loads a published LoRA adapter between two batches, while requests keep coming; and each
kind of checkpoint (save_pretrained directory, state-dict file, PEFT adapter) loads
beside the base weights.

In process (the switch logic on real workers is tests/test_rl_policy_pg.py, with the
scripted model): the cost here is loading SmolLM2 once.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
from conftest import need

from megaflow.model.base import Message, ModelRequest, SamplingParams
from megaflow.model.config import TransformersModelConfig
from megaflow.model.policy import PolicyRef
from megaflow.model.smollm import INSTALL_HINT, smollm2_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUEST = ModelRequest(messages=[Message(role="user", content="Say hello.")],
                       sampling=SamplingParams(temperature=0.0, max_tokens=12))


def random_lora(root: Path) -> str:
    """A PEFT LoRA adapter for SmolLM2-135M (q_proj, v_proj of its 30 layers) with random weights large
    enough to change what it says; written straight from its tensors (peft writes the config)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    path = root / "lora"
    LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(
        str(path))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, 576, generator=gen) * 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * 0.5
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def test_smollm2_loads_a_published_lora_adapter_between_batches(tmp_path):
    for package in ("torch", "transformers", "gguf", "peft"):
        need(package, importlib.util.find_spec(package) is not None, "install the model packages")
    need("SmolLM2 weights", smollm2_available(), INSTALL_HINT)
    from megaflow.model.hf import TransformersModel
    from megaflow.model.policy import check_checkpoint

    adapter = check_checkpoint(random_lora(tmp_path), "lora")  # what publish_policy accepts
    # A long gathering window: the calls queued before the swap wait for it, in one batch.
    model = TransformersModel(TransformersModelConfig(max_batch_size=8, max_wait_ms=3000.0))
    started = time.monotonic()
    try:
        model.load()
        loaded = time.monotonic()
        results: dict[str, object] = {}

        def ask(name: str) -> None:
            results[name] = model.generate(REQUEST)

        before = [threading.Thread(target=ask, args=(f"before{i}",)) for i in range(3)]
        for t in before:
            t.start()
        deadline = time.monotonic() + 30
        while len(model._batcher._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the three calls are queued (their batch is still gathering)
        swap = model.load_policy(PolicyRef("default", 1, adapter, "lora"))
        after = [threading.Thread(target=ask, args=(f"after{i}",)) for i in range(3)]
        for t in after:
            t.start()
        for t in before + after:
            t.join(120)
        swap.result(60)
        switched = time.monotonic()
        old = {results[f"before{i}"].text for i in range(3)}
        new = {results[f"after{i}"].text for i in range(3)}
        # Queued before the swap: the old weights, all of them; after: the adapter's, all of them.
        assert {results[f"before{i}"].policy_version for i in range(3)} == {0}
        assert {results[f"after{i}"].policy_version for i in range(3)} == {1}
        assert model.stats.sizes[:2] == [3, 3], model.stats.sizes  # no batch spanned the swap
        # Same prompt, greedy: only the weights differ, and so does the answer.
        assert old.isdisjoint(new), (old, new)
        prompts = {tuple(r.prompt_token_ids) for r in results.values()}
        assert len(prompts) == 1 and all(isinstance(t, int) for t in next(iter(prompts)))
    finally:
        model.close()
    print(f"SmolLM2: loaded in {loaded - started:.1f}s; 6 calls and the LoRA switch in {switched - loaded:.1f}s")


def test_transformers_weights_load_full_state_dict_and_lora_beside_the_base(tmp_path):
    """`load_transformers` on a tiny random Llama: each kind gives a new model, the base stays as it was.

    (Here with the real-model test, not in the fast suite: importing torch, transformers and peft
    alone takes tens of seconds on the shared test machine.)
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaflow.model.policy import check_checkpoint
    from megaflow.model.weights import load_transformers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    trained = LlamaForCausalLM(config)
    trained.save_pretrained(tmp_path / "full")
    save_file(trained.state_dict(), str(tmp_path / "weights.safetensors"))
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "lora")
    key = "model.layers.0.self_attn.q_proj.weight"
    for kind, path in (("full", tmp_path / "full"), ("full", tmp_path / "weights.safetensors"),
                       ("lora", tmp_path / "lora")):
        model = load_transformers(base, PolicyRef("p", 1, check_checkpoint(str(path), kind), kind), "cpu")
        assert model is not base and not model.training
        if kind == "full":
            assert torch.equal(model.state_dict()[key], trained.state_dict()[key])
        else:  # merged: the base's weights plus the adapter's product
            assert not torch.equal(model.state_dict()[key], original[key])
            assert "lora" not in " ".join(model.state_dict())
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
