"""The ModelClient interface: messages in, completion out."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator


def check_tool_calls(calls: list[dict] | None) -> list[dict] | None:
    """Tool calls in the OpenAI shape: ``{"id", "type": "function", "function": {"name", "arguments"}}``.

    ``arguments`` is a JSON string, as the OpenAI API sends it (not yet parsed: a model
    may emit arguments that are not valid JSON, and that is the agent's format error).

    Raises:
        ValueError: a call is not in that shape (names the call and what is wrong).
    """
    if calls is None:
        return None
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ValueError(f"tool call {i} must be {{id, type: 'function', function: {{name: str, arguments: "  # noqa: TRY004 - pydantic reports only ValueError
                             f"JSON string}}}}, got {call!r:.200}")
        if call.get("type", "function") != "function" or not isinstance(call.get("id", ""), str):
            raise ValueError(f"tool call {i}: type must be 'function' and id a string, got {call!r:.200}")
    return calls


class Message(BaseModel):
    """One chat message (OpenAI shape; an assistant may carry tool calls, a tool message answers one)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] = Field(
        description="Text, or OpenAI content parts for a multimodal message: {type: text, text} and "
        "{type: image_url, image_url: {url}} (computer-use screenshots).")
    tool_calls: list[dict] | None = Field(
        default=None, description="An assistant message's tool calls, OpenAI shape (see check_tool_calls).")
    tool_call_id: str | None = Field(default=None, description="A tool message: the id of the call it answers.")

    @field_validator("tool_calls")
    @classmethod
    def _check_calls(cls, calls: list[dict] | None) -> list[dict] | None:
        return check_tool_calls(calls)

    def wire(self) -> dict:
        """The message as a plain dict, leaving out tool fields that are not set (what chat APIs expect)."""
        return self.model_dump(exclude_none=True)


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
    tools: list[dict] | None = Field(
        default=None, description='Tools the model may call, OpenAI shape: [{"type": "function", "function": '
        '{"name", "description", "parameters": JSON schema}}]. None: plain text only.')
    tool_choice: str | dict | None = Field(
        default=None, description='"auto" | "none" | "required" | {"type": "function", "function": {"name"}}; '
        "None: the backend's default.")


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
    policy_version: int | None = Field(
        default=None, description="The published policy version (`client.publish_policy`) whose weights sampled "
        "this completion; None: the backend follows no policy.")
    prompt_token_ids: list[int] | None = Field(
        default=None, description="The prompt as the backend tokenized it, where it says (a trainer scores these ids).")
    tool_calls: list[dict] | None = Field(
        default=None, description="Tool calls the model made, OpenAI shape (see check_tool_calls); "
        "None: it made none. `text` is then any content beside them.")

    @field_validator("tool_calls")
    @classmethod
    def _check_calls(cls, calls: list[dict] | None) -> list[dict] | None:
        return check_tool_calls(calls)


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
