"""Model backend configs (one pydantic model per backend) and the factory."""

from __future__ import annotations

from typing import Annotated, Literal

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megaflow.model.base import ModelClient, SamplingParams


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    sampling: SamplingParams = Field(default_factory=SamplingParams, description="Default sampling settings.")
    version: str = Field(default="", description="Weights version tag recorded on every completion.")


class ScriptedModelConfig(_Base):
    """Deterministic fake: replies come from a script. For tests and benchmarks."""

    type: Literal["scripted"] = "scripted"
    replies: list[str] = Field(
        min_length=1,
        default_factory=lambda: ["```bash\necho step {step}\n```", "```bash\nsubmit\n```"],
        description="Replies in order, one per call within an episode; the last repeats. "
        "`{step}` is replaced by the step index, `{version}` by the policy version it follows (rl runs).",
    )
    latency_s: float = Field(default=0.0, ge=0.0, le=3600.0, description="Simulated latency per call.")
    name: str = Field(default="scripted", description="Model name reported on completions.")


class TransformersModelConfig(_Base):
    """A transformers model loaded in the model worker's process, with dynamic batching."""

    type: Literal["transformers"] = "transformers"
    model: str = Field(default="smollm2", description="'smollm2' (the shipped SmolLM2-135M) or a local path.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model`, if any.")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="Largest generate() batch.")
    max_wait_ms: float = Field(default=20.0, ge=0.0, le=10_000.0, description="How long to gather a batch.")
    context_tokens: int = Field(default=8192, ge=16, description="Prompt+completion token limit.")
    device: str = Field(default="cpu", description="torch device.")


class OpenAIModelConfig(_Base):
    """An OpenAI-compatible HTTP server: vLLM, SGLang, `transformers serve`, hosted APIs."""

    type: Literal["openai"] = "openai"
    model: str = Field(description="Model name the server expects.")
    endpoints: list[str] = Field(min_length=1, description="Base URLs, e.g. http://host:8000/v1.")
    api_key_env: str | None = Field(default=None, description="Env var holding the API key (never the key itself).")
    timeout_s: float = Field(default=120.0, gt=0, le=3600.0, description="Per-request timeout.")
    max_connections: int = Field(default=64, ge=1, le=10_000, description="Connection limit per endpoint.")
    max_retries: int = Field(default=4, ge=0, le=20, description="Retries on 5xx, refusals and timeouts.")
    weight_sync: str = Field(
        default="vllm", pattern=r"^(vllm|sglang|hook:[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?)$",
        description="How an rl run's published policies reach the servers: 'vllm' (LoRA: /v1/load_lora_adapter; "
        "full: /collective_rpc in dev mode), 'sglang' (/update_weights_from_disk, /load_lora_adapter), or "
        "'hook:pkg.module.function', called with (ref, endpoints) and returning the model name to request "
        "(None: unchanged). See docs/rl.md.")

    @field_validator("endpoints")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoint {url!r} must be an http(s) URL such as http://host:8000/v1")
            if parts.username or parts.password:
                raise ValueError("endpoints must not carry credentials: name an environment variable in api_key_env")
        return value


class VLLMModelConfig(_Base):
    """vLLM's in-process engine (GPU hosts only)."""

    type: Literal["vllm"] = "vllm"
    model: str = Field(description="Model path or name for vllm.LLM.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length override.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1.0)
    enable_lora: bool = Field(default=False, description="Start the engine with LoRA support (for LoRA policies).")
    max_lora_rank: int = Field(default=16, ge=1, le=1024, description="Largest LoRA rank the engine accepts.")


ModelConfig = Annotated[
    ScriptedModelConfig | TransformersModelConfig | OpenAIModelConfig | VLLMModelConfig,
    Field(discriminator="type"),
]


def make_client(config: ModelConfig) -> ModelClient:
    """Build the client for a config; heavy imports happen only for the backend used."""
    if config.type == "scripted":
        from megaflow.model.scripted import ScriptedModel

        return ScriptedModel(config)
    if config.type == "transformers":
        from megaflow.model.hf import TransformersModel

        return TransformersModel(config)
    if config.type == "openai":
        from megaflow.model.openai_http import OpenAIModel

        return OpenAIModel(config)
    if config.type == "vllm":
        from megaflow.model.vllm_engine import VLLMModel

        return VLLMModel(config)
    raise ValueError(f"unknown model backend {config.type!r}")
