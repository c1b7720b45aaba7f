"""transformers model in the worker's own process, with dynamic batching.

Each `generate()` call tokenizes its prompt on the caller's thread (so a prompt too
long fails at once, before it queues), then waits while a `MicroBatcher` thread
runs it in one `model.generate()` batch with other calls of compatible sampling:

* greedy calls share a batch whatever their `max_tokens`; sampled calls share one when
  temperature, top_p and seed agree; stop strings must agree too (they stop rows early);
* prompts are left-padded; the batch runs to the largest `max_tokens` while a per-row
  stopping criterion ends each row at its own cap, which is then reported as 'length';
* logprobs are of the raw model distribution (before temperature and top_p), as vLLM
  reports them by default, recorded step by step so memory stays one row per sequence.

torch and transformers are imported on first use only.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Completion, Message, ModelRequest, SamplingParams, Usage
from megaflow.model.batching import BatchStats, Job, MicroBatcher, PolicySwitch, wait_result
from megaflow.model.config import TransformersModelConfig
from megaflow.model.gguf_cache import hf_source
from megaflow.model.policy import PolicyRef
from megaflow.model.smollm import ALIAS, smollm2_path
from megaflow.model.toolcalls import parse_tool_calls, render_prompt
from megaflow.model.weights import load_transformers

logger = logging.getLogger(__name__)

#: Stop-string matchers are costly to build (they scan the vocabulary): keep a few.
_STOP_CACHE_SIZE = 32


@dataclass
class _Prompt:
    """What a caller hands to the batcher thread."""

    ids: list[int]
    max_new: int
    sampling: SamplingParams


@dataclass
class _Row:
    """One row's answer, before it becomes a Completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int = 0


def _group_key(sampling: SamplingParams) -> tuple:
    stop = tuple(sampling.stop)
    if sampling.temperature == 0:
        return ("greedy", stop)
    return ("sample", sampling.temperature, sampling.top_p, sampling.seed, stop)


class TransformersModel:
    """A `ModelClient` running a transformers causal LM in this process.

    Thread-safe: call `generate()` from as many threads as you like; concurrent calls
    are batched. Loads the model on first use; `close()` frees it.

    Args:
        config: Which weights, batching limits, context length, device.
    """

    def __init__(self, config: TransformersModelConfig | None = None):
        self.config = config or TransformersModelConfig()
        self.name = self.config.model
        self.version = self.config.version
        self.context_tokens = self.config.context_tokens
        self._load_lock = threading.Lock()
        # Fast tokenizers may raise "Already borrowed" when shared across threads.
        self._tok_lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None
        self._eos_ids: set[int] = set()
        self._stop_cache: dict[tuple[str, ...], Any] = {}
        self._closed = False
        self._base: Any = None  # the config's weights: what LoRA adapters and state dicts apply to
        self._batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=self.config.max_batch_size,
            max_wait_s=self.config.max_wait_ms / 1000.0,
            name=f"megaflow-batcher-{self.name}",
        )
        self._policy = PolicySwitch(self._batcher, self._swap)

    @property
    def stats(self) -> BatchStats:
        """Batch counters, to check that concurrent calls were batched."""
        return self._batcher.stats

    def generate(self, request: ModelRequest) -> Completion:
        """Run one generation, batched with concurrent calls.

        Raises:
            ContextLengthError: the prompt has `context_tokens` tokens or more.
            ModelUnavailableError: the client is closed, or generation failed.
        """
        self.load()
        started = time.monotonic()
        ids = self._encode(request.messages, request.tools)
        room = self.context_tokens - len(ids)
        if room <= 0:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_tokens} tokens; "
                f"the prompt has {len(ids)} tokens."
            )
        sampling = request.sampling
        prompt = _Prompt(ids=ids, max_new=min(sampling.max_tokens, room), sampling=sampling)
        row: _Row = wait_result(self._batcher.submit(_group_key(sampling), prompt), request.timeout_s)
        text, calls = row.text, None
        if request.tools:
            # The token ids stay the raw ones, markup included: that is what the model generated.
            parsed = parse_tool_calls(row.text)
            text, calls = parsed.content, parsed.calls or None
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=row.finish_reason,
            token_ids=row.token_ids,
            logprobs=row.logprobs if sampling.logprobs else None,
            usage=Usage(prompt_tokens=len(ids), completion_tokens=len(row.token_ids)),
            latency_s=time.monotonic() - started,
            model=self.name,
            model_version=self.version,
            policy_version=row.policy_version,
            prompt_token_ids=ids,
        )

    @property
    def policy_version(self) -> int:
        """The published policy version generating now (0: the config's weights)."""
        return self._policy.version

    def load_policy(self, ref: PolicyRef) -> Future | None:
        """Switch to a published version before any request submitted after this call.

        The swap is a barrier on the batcher thread (`PolicySwitch`): batches queued
        before it finish on the old weights, then the new ones are loaded, then
        batching resumes. Asking for a version not newer than the one asked for last
        does nothing (returns None).

        Returns:
            The swap's future (done once the new weights serve), or None.
        """
        return self._policy.request(ref)

    def _swap(self, ref: PolicyRef) -> None:
        self.load()
        started = time.monotonic()
        self._model = load_transformers(self._base, ref, self.config.device)
        logger.info("policy %s version %d (%s) loaded in %.1fs", ref.policy, ref.version, ref.kind,
                    time.monotonic() - started)

    def close(self) -> None:
        """Stop the batcher thread and free the model. Idempotent."""
        with self._load_lock:
            self._closed = True
            self._batcher.close()
            self._model = None
            self._base = None
            self._tokenizer = None
            self._stop_cache.clear()
        gc.collect()

    # -- loading ---------------------------------------------------------------

    def load(self) -> None:
        """Load the weights now rather than on the first call (a server does, before listening).

        Raises:
            ModelUnavailableError: the client is closed.
            FileNotFoundError: the weights are not installed.
        """
        if self._model is not None:
            return
        with self._load_lock:
            if self._closed:
                raise ModelUnavailableError(f"model {self.name!r} is closed")
            if self._model is None:
                self._load()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.config.model == ALIAS:
            path, gguf_file = smollm2_path()
        else:
            path, gguf_file = self.config.model, self.config.gguf_file
        # A worker must never download weights at run time: only local files count.
        kwargs: dict[str, Any] = {"local_files_only": True}
        started = time.monotonic()
        source = hf_source(path, gguf_file)  # GGUF: its cached converted directory (converted once per machine)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model.to(self.config.device)
        model.eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and limit < self.context_tokens:
            logger.info("context_tokens %d capped to the model's %d", self.context_tokens, limit)
            self.context_tokens = limit
        if not self.version:
            self.version = os.path.basename(gguf_file or os.path.normpath(path))
        self._tokenizer, self._eos_ids = tokenizer, eos_ids
        self._base = model
        self._model = model  # last: its being set tells other threads loading is done
        logger.info("loaded %s in %.1fs on %s", self.name, time.monotonic() - started, self.config.device)

    def _encode(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        with self._tok_lock:
            tokenizer = self._tokenizer
            if tokenizer is None:
                raise ModelUnavailableError(f"model {self.name!r} is closed")
            text = render_prompt(tokenizer, messages, tools)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The vocabulary's strings for token ids (for OpenAI-style logprobs)."""
        self.load()
        with self._tok_lock:
            return list(self._tokenizer.convert_ids_to_tokens(token_ids))

    # -- the batcher thread ----------------------------------------------------

    def _run_batch(self, jobs: list[Job]) -> None:
        import torch

        model, tokenizer = self._model, self._tokenizer
        if model is None:
            raise ModelUnavailableError(f"model {self.name!r} is closed")
        prompts: list[_Prompt] = [job.payload for job in jobs]
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p.ids) :] = torch.tensor(p.ids, dtype=torch.long)
            attention[i, width - len(p.ids) :] = 1
        sampling = prompts[0].sampling
        version = self.policy_version  # swaps run on this thread: fixed for the whole batch
        recorder, kwargs = self._generate_kwargs(prompts, width, sampling)
        started = time.monotonic()
        with torch.inference_mode():
            if sampling.temperature > 0 and sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # only this thread runs torch generation
            sequences = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device), **kwargs
            ).cpu()
        if self._batcher.closing:
            raise ModelUnavailableError("model closed during generation")
        logprobs = recorder.finish(sequences[:, -1]).cpu()
        generated = sequences[:, width:]
        logger.debug("batch of %d: %d steps in %.2fs", len(jobs), generated.shape[1], time.monotonic() - started)
        for i, (job, p) in enumerate(zip(jobs, prompts)):
            row = self._cut_row(generated[i].tolist(), logprobs[i].tolist(), p)
            row.policy_version = version
            job.future.set_result(row)

    def _generate_kwargs(self, prompts: list[_Prompt], width: int, sampling: SamplingParams):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        recorder = _logprob_recorder()
        limits = [p.max_new for p in prompts]
        criteria: list[Any] = [_row_limits(width, limits), _abort_when(lambda: self._batcher.closing)]
        if sampling.stop:
            criteria.append(self._stop_criterion(tuple(sampling.stop)))
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(limits),
            "pad_token_id": self._tokenizer.pad_token_id,
            "eos_token_id": sorted(self._eos_ids),
            "logits_processor": LogitsProcessorList([recorder]),
            "stopping_criteria": StoppingCriteriaList(criteria),
        }
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return recorder, kwargs

    def _stop_criterion(self, stop: tuple[str, ...]) -> Any:
        from transformers import StopStringCriteria

        criterion = self._stop_cache.get(stop)
        if criterion is None:
            if len(self._stop_cache) >= _STOP_CACHE_SIZE:
                self._stop_cache.clear()
            criterion = StopStringCriteria(tokenizer=self._tokenizer, stop_strings=list(stop))
            self._stop_cache[stop] = criterion
        return criterion

    def _cut_row(self, tokens: list[int], logprobs: list[float], prompt: _Prompt) -> _Row:
        """Trim one row to what this request generated: its EOS, cap or stop string."""
        length, finish = len(tokens), "length"
        for k, token in enumerate(tokens):
            if token in self._eos_ids:
                # The EOS id stays in token_ids: an RL trainer must learn to stop too.
                length, finish = k + 1, "stop"
                break
            if k + 1 >= prompt.max_new:
                length, finish = k + 1, "length"
                break
        with self._tok_lock:
            text = self._tokenizer.decode(tokens[:length], skip_special_tokens=True)
            hit = _first_stop(text, prompt.sampling.stop)
            if hit is not None:
                # Rows stopped by a stop string go on as padding; find where it completed.
                text = text[:hit]
                for k in range(1, length + 1):
                    prefix = self._tokenizer.decode(tokens[:k], skip_special_tokens=True)
                    if _first_stop(prefix, prompt.sampling.stop) is not None:
                        length, finish = k, "stop"
                        break
        return _Row(text=text, token_ids=tokens[:length], logprobs=logprobs[:length], finish_reason=finish)


def _first_stop(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def _logprob_recorder() -> Any:
    """A logits processor recording each chosen token's raw logprob.

    transformers runs user processors before temperature and top_p, so the scores seen
    here are the model's own. At each step the token chosen at the previous step is
    the last input id, so only one row of log-softmax per sequence is kept.
    """
    import torch
    from transformers import LogitsProcessor

    class _Recorder(LogitsProcessor):
        def __init__(self) -> None:
            self.steps: list[torch.Tensor] = []
            self._previous: torch.Tensor | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self._previous is not None:
                self.steps.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
            self._previous = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
            if self._previous is not None:
                self.steps.append(self._previous.gather(1, last_tokens.to(self._previous.device)[:, None]).squeeze(1))
                self._previous = None
            return torch.stack(self.steps, dim=1)

    return _Recorder()


def _row_limits(width: int, limits: list[int]) -> Any:
    """A stopping criterion ending each row at its own `max_tokens`."""
    import torch
    from transformers import StoppingCriteria

    class _RowLimits(StoppingCriteria):
        def __init__(self) -> None:
            self.limits = torch.tensor(limits)

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            done = (input_ids.shape[1] - width) >= self.limits
            return done.to(input_ids.device)

    return _RowLimits()


def _abort_when(closing: Any) -> Any:
    """A stopping criterion ending the whole batch once the model is being closed."""
    import torch
    from transformers import StoppingCriteria

    class _Abort(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), bool(closing()), device=input_ids.device)

    return _Abort()
