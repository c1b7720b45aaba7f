"""vLLM's offline engine (`vllm.LLM`) in the worker's process, for GPU hosts.

`vllm.LLM.generate` is not meant to be called from many threads at once, but it
schedules a list of prompts far better than one at a time. So calls from the
worker's threads are gathered by a `MicroBatcher` and each batch is one `generate()`
call; every prompt keeps its own `SamplingParams`, so all calls are compatible.

vLLM is imported on first use; without it, `generate()` raises `ImportError`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Completion, ModelRequest, Usage
from megaflow.model.batching import Job, MicroBatcher, PolicySwitch, wait_result
from megaflow.model.config import VLLMModelConfig
from megaflow.model.policy import PolicyRef
from megaflow.model.toolcalls import parse_tool_calls, render_prompt
from megaflow.model.weights import lora_name, reload_vllm_worker

logger = logging.getLogger(__name__)

#: vLLM schedules within a batch itself; these only bound how calls are gathered.
_MAX_BATCH = 256
_MAX_WAIT_S = 0.005


class VLLMModel:
    """A `ModelClient` running `vllm.LLM` in this process. Thread-safe.

    Args:
        config: Model path or name, context length, GPU memory share.
    """

    def __init__(self, config: VLLMModelConfig):
        self.config = config
        self.name = config.model
        self.version = config.version or config.model
        self._lora: Any = None  # the LoRARequest every prompt carries, when the policy is an adapter
        self._load_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_len = 0
        self._closed = False
        self._batcher = MicroBatcher(
            self._run_batch, max_batch_size=_MAX_BATCH, max_wait_s=_MAX_WAIT_S, name="megaflow-vllm"
        )
        self._policy = PolicySwitch(self._batcher, self._swap)

    def load(self) -> None:
        """Start the engine now rather than on the first call.

        Raises:
            ImportError: vLLM is not installed.
            ModelUnavailableError: the client is closed.
        """
        if self._llm is not None:
            return
        with self._load_lock:
            if self._closed:
                raise ModelUnavailableError(f"model {self.name!r} is closed")
            if self._llm is not None:
                return
            try:
                import vllm
            except ImportError as exc:
                raise ImportError(
                    "the 'vllm' model backend needs vLLM, which runs on GPU hosts: `pip install vllm` there, "
                    "or use the 'openai' backend against a vLLM server"
                ) from exc
            kwargs: dict[str, Any] = {
                "model": self.config.model,
                "gpu_memory_utilization": self.config.gpu_memory_utilization,
            }
            if self.config.max_model_len:
                kwargs["max_model_len"] = self.config.max_model_len
            if self.config.enable_lora:
                kwargs.update(enable_lora=True, max_lora_rank=self.config.max_lora_rank)
            llm = vllm.LLM(**kwargs)
            self._tokenizer = llm.get_tokenizer()
            # Newer vLLM exposes model_config on LLM itself; every version has it on the engine.
            model_config = getattr(llm, "model_config", None) or llm.llm_engine.model_config
            self._max_len = int(model_config.max_model_len)
            self._llm = llm

    def generate(self, request: ModelRequest) -> Completion:
        """Run one generation, batched with concurrent calls.

        Raises:
            ImportError: vLLM is not installed.
            ContextLengthError: the prompt has `max_model_len` tokens or more.
            ModelUnavailableError: the client is closed, or the engine failed.
        """
        self.load()  # first: it turns a missing vLLM into a clear ImportError
        from vllm import SamplingParams

        started = time.monotonic()
        with self._tok_lock:
            # The same rendering as the transformers backend, tools included, so one parser reads both.
            text = render_prompt(self._tokenizer, request.messages, request.tools)
            ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        room = self._max_len - len(ids)
        if room <= 0:
            raise ContextLengthError(
                f"This model's maximum context length is {self._max_len} tokens; the prompt has {len(ids)} tokens."
            )
        s = request.sampling
        params = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=min(s.max_tokens, room),
            stop=s.stop or None,
            seed=s.seed,
            logprobs=1 if s.logprobs else None,
        )
        job = self._batcher.submit("all", ({"prompt_token_ids": ids}, params))
        result, version = wait_result(job, request.timeout_s)
        output = result.outputs[0]
        token_ids = list(output.token_ids)
        logprobs = None
        if s.logprobs and output.logprobs:
            # Each step maps token id -> Logprob; the sampled token is always among them.
            logprobs = [step[tid].logprob for step, tid in zip(output.logprobs, token_ids)]
        text, calls = output.text, None
        if request.tools:
            parsed = parse_tool_calls(output.text)
            text, calls = parsed.content, parsed.calls or None
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=output.finish_reason or "stop",
            token_ids=token_ids,
            logprobs=logprobs,
            usage=Usage(prompt_tokens=len(ids), completion_tokens=len(token_ids)),
            latency_s=time.monotonic() - started,
            model=self.name,
            model_version=self.version,
            policy_version=version,
            prompt_token_ids=ids,
        )

    def load_policy(self, ref: PolicyRef) -> Future | None:
        """Switch to a published version before any request submitted after this call.

        A barrier on the batcher thread, between two ``generate`` calls: a LoRA version
        becomes the ``LoRARequest`` every later prompt carries (the engine needs
        ``enable_lora``); full weights are loaded into every worker's model through
        ``LLM.collective_rpc`` (`weights.reload_vllm_worker`, the way vLLM's RLHF examples
        update weights in place). Not run here on a GPU: tested with a fake engine.

        Returns:
            The swap's future, or None when `ref` is not newer than the last one asked for.
        """
        return self._policy.request(ref)

    @property
    def policy_version(self) -> int:
        """The published policy version generating now (0: the config's weights)."""
        return self._policy.version

    def _swap(self, ref: PolicyRef) -> None:
        self.load()
        if ref.kind == "lora":
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest(lora_name(ref), ref.version, ref.path)
        else:
            self._llm.collective_rpc(reload_vllm_worker, args=(ref.path,))
            self._lora = None
        logger.info("policy %s version %d (%s) in use", ref.policy, ref.version, ref.kind)

    def close(self) -> None:
        """Stop the batcher and drop the engine, freeing GPU memory. Idempotent."""
        with self._load_lock:
            self._closed = True
            self._batcher.close()
            self._llm = None
            self._tokenizer = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _run_batch(self, jobs: list[Job]) -> None:
        llm = self._llm
        if llm is None:
            raise ModelUnavailableError(f"model {self.name!r} is closed")
        prompts = [job.payload[0] for job in jobs]
        params = [job.payload[1] for job in jobs]
        version, lora = self.policy_version, self._lora  # swaps run on this thread: fixed for the batch
        extra = {"lora_request": lora} if lora is not None else {}
        # LLM.generate returns outputs in the order of its inputs.
        outputs = llm.generate(prompts, params, use_tqdm=False, **extra)
        for job, output in zip(jobs, outputs):
            job.future.set_result((output, version))
