"""The real model switching weights (issue 18, point 2): SmolLM2-135M in the transformers
backend loads a published LoRA adapter between two batches, while requests keep coming.

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
