"""The ModelClient interface: messages in, completion out."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class SamplingParams(BaseModel):
    """Sampling settings for one call."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=256, ge=1, le=131_072, description="Completion token cap.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    seed: int | None = Field(default=None, description="Sampling seed where the backend supports one.")
    logprobs: bool = Field(default=True, description="Ask for token ids and logprobs where supported.")


class ModelRequest(BaseModel):
    """One generation request."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str = Field(default="", description="Caller's id, for logs and idempotency.")
    timeout_s: float | None = Field(
        default=None, gt=0, description="Deadline for the whole call, retries included; past it the backend "
        "raises ModelUnavailableError (an infra failure). None: the backend's own timeouts only.")


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Completion(BaseModel):
    """What the model answered."""

    model_config = ConfigDict(extra="forbid")

    text: str
    finish_reason: str = Field(default="stop", description="stop | length | error")
    token_ids: list[int] | None = Field(default=None, description="Completion token ids, where given.")
    logprobs: list[float] | None = Field(default=None, description="Per-token logprobs, where given.")
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    model: str = Field(default="", description="Model name as served.")
    model_version: str = Field(default="", description="Weights version, for off-policy tracking in RL.")


@runtime_checkable
class ModelClient(Protocol):
    """A model backend.

    Raises (generate):
        ContextLengthError: the prompt does not fit; not retried.
        ModelUnavailableError: the server is down, refused or timed out; retried.
        MalformedResponseError: the answer could not be parsed; retried.
    """

    name: str

    def generate(self, request: ModelRequest) -> Completion:
        """Run one generation."""

    def close(self) -> None:
        """Release connections and model memory. Idempotent."""
