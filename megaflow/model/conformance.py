"""The checks every model backend passes, whatever it runs on.

Each check is a plain function taking a `ModelClient`; it returns nothing and raises
`AssertionError` saying what is wrong. Backend tests run all of `CHECKS`:

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(client, check):
        check(client)

The prompts are short and `max_tokens` small, so the checks are cheap on a CPU model.
"""

from __future__ import annotations

from collections.abc import Callable

from megaflow.errors import ContextLengthError
from megaflow.model.base import Completion, Message, ModelClient, ModelRequest, SamplingParams

#: Words in the prompt that must overflow any context: 200k words is past 128k tokens.
OVERFLOW_WORDS = 200_000


def _ask(client: ModelClient, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0) -> Completion:
    request = ModelRequest(
        messages=[Message(role="user", content=prompt)],
        sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens),
        request_id="conformance",
    )
    completion = client.generate(request)
    _require(isinstance(completion, Completion), f"generate() returned {type(completion).__name__}, not Completion")
    return completion


def _require(condition: bool, message: str) -> None:
    # Not `assert`: these must hold under `python -O` as well.
    if not condition:
        raise AssertionError(message)


def check_completion(client: ModelClient) -> None:
    """A plain question gets non-empty text, a known finish reason, a model name."""
    c = _ask(client, "Say hello in one short sentence.")
    _require(bool(c.text.strip()), f"empty text: {c!r}")
    _require(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
    _require(bool(c.model), "no model name on the completion")
    _require(c.latency_s >= 0, f"negative latency {c.latency_s}")


def check_usage(client: ModelClient) -> None:
    """Tokens are counted; token ids and logprobs, where given, match that count."""
    c = _ask(client, "Name three colours.")
    _require(c.usage.prompt_tokens > 0, f"prompt_tokens {c.usage.prompt_tokens}")
    _require(c.usage.completion_tokens > 0, f"completion_tokens {c.usage.completion_tokens}")
    if c.token_ids is not None:
        _require(
            len(c.token_ids) == c.usage.completion_tokens,
            f"{len(c.token_ids)} token ids for {c.usage.completion_tokens} completion tokens",
        )
    if c.logprobs is not None:
        _require(len(c.logprobs) == c.usage.completion_tokens, f"{len(c.logprobs)} logprobs")
        _require(all(lp <= 1e-4 for lp in c.logprobs), f"positive logprob in {c.logprobs}")


def check_deterministic(client: ModelClient) -> None:
    """Temperature 0 gives the same answer twice."""
    prompt = "What is the capital of France? Answer in one sentence."
    first, second = _ask(client, prompt), _ask(client, prompt)
    _require(first.text == second.text, f"greedy answers differ: {first.text!r} vs {second.text!r}")
    if first.token_ids is not None and second.token_ids is not None:
        _require(first.token_ids == second.token_ids, "greedy token ids differ")


def check_max_tokens(client: ModelClient) -> None:
    """`max_tokens` caps the completion, and the cap is reported as 'length'."""
    c = _ask(client, "Write a long story about a dragon and a knight.", max_tokens=3)
    _require(c.finish_reason == "length", f"finish_reason {c.finish_reason!r} at max_tokens=3")
    _require(0 < c.usage.completion_tokens <= 3, f"completion_tokens {c.usage.completion_tokens} at max_tokens=3")


def check_context_overflow(client: ModelClient, words: int = OVERFLOW_WORDS) -> None:
    """A prompt past the context raises `ContextLengthError`, not a retryable error."""
    try:
        c = _ask(client, "lorem " * words, max_tokens=1)
    except ContextLengthError:
        return
    raise AssertionError(f"a {words}-word prompt did not raise ContextLengthError: {c!r}")


CHECKS: tuple[Callable[[ModelClient], None], ...] = (
    check_completion,
    check_usage,
    check_deterministic,
    check_max_tokens,
    check_context_overflow,
)
