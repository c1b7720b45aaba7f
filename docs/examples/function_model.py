"""A worked example of a model backend: any Python function as the model.

`FunctionModel` implements `megaflow.model.base.ModelClient` (``name``, ``generate``,
``close``) and passes every check of `megaflow.model.conformance.CHECKS` (run by
`tests/test_docs_examples.py`). Its "tokens" are whitespace-separated words, which
keeps the example free of a tokenizer; a real backend counts the model's own tokens.

What a backend must get right, and where this one does it:

* ``max_tokens`` caps the completion, reported as ``finish_reason="length"``;
* a prompt past the context raises `ContextLengthError` (the agent's failure, not
  retried), while a backend that cannot answer raises `ModelUnavailableError`
  (infra, retried by the model hop);
* ``usage``, ``token_ids`` and ``logprobs`` agree in length (trainers rely on it);
* the same request at temperature 0 gives the same text (redelivered hops replay).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Completion, Message, ModelRequest, Usage


class FunctionModelConfig(BaseModel):
    """The backend's config: one pydantic model, ``extra="forbid"``, a docstring per field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"] = "function"
    context_words: int = Field(default=4096, ge=16, description="Prompt words beyond which a call is refused.")
    name: str = Field(default="function", description="Model name reported on completions.")


class FunctionModel:
    """Answers with ``fn(messages)``.

    Args:
        fn: Maps the conversation to the reply text; an exception it raises is an
            infra failure (`ModelUnavailableError`), as a server's 5xx would be.
        config: Context size and name.
    """

    name = "function"

    def __init__(self, fn: Callable[[list[Message]], str], config: FunctionModelConfig | None = None):
        self.fn = fn
        self.config = config or FunctionModelConfig()

    def generate(self, request: ModelRequest) -> Completion:
        """One call. Raises ContextLengthError or ModelUnavailableError (see the module docstring)."""
        started = time.monotonic()
        prompt_words = sum(len(m.content.split()) for m in request.messages)
        if prompt_words > self.config.context_words:
            raise ContextLengthError(f"prompt of {prompt_words} words exceeds {self.config.context_words}")
        try:
            text = self.fn(request.messages)
        except Exception as exc:  # the function is the "server": its failure is the platform's, not the agent's
            raise ModelUnavailableError(f"model function failed: {exc}") from exc
        words = text.split()
        finish = "stop"
        if len(words) > request.sampling.max_tokens:
            words, finish = words[: request.sampling.max_tokens], "length"
            text = " ".join(words)
        return Completion(
            text=text,
            finish_reason=finish,
            token_ids=[zlib.crc32(w.encode()) & 0xFFFF for w in words],  # stable across processes
            logprobs=[0.0] * len(words),
            usage=Usage(prompt_tokens=prompt_words, completion_tokens=len(words)),
            latency_s=time.monotonic() - started,
            model=self.config.name,
        )

    def close(self) -> None:
        """Nothing to release."""


def polite_echo(messages: list[Message]) -> str:
    """A toy model function: greets, then repeats the last user message."""
    last = next((m.content for m in reversed(messages) if m.role == "user"), "")
    return f"Hello! You said: {last}"
