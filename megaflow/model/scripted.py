"""The scripted fake model shipped for tests and benchmarks.

Deterministic and stateless: the reply for a call is chosen by how many assistant
messages the prompt already holds, so a redelivered call gets the same answer.

Tool calls are scripted as a Hermes-format model writes them
(``<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>``): when the
request offers tools, a reply is read by the same parser as the in-process backends',
so the fake answers in the OpenAI shape as they do (and a malformed call stays text).
"""

from __future__ import annotations

import re
import time

from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Completion, ModelRequest, Usage
from megaflow.model.config import ScriptedModelConfig
from megaflow.model.toolcalls import parse_tool_calls

#: A prompt longer than this many characters is refused, to exercise the error path.
MAX_PROMPT_CHARS = 1_000_000

#: The fake's "tokens" are whitespace-separated words.
_WORD = re.compile(r"\S+")


class ScriptedModel:
    """Replies from `config.replies`, one per turn; the last reply repeats.

    A reply longer than `sampling.max_tokens` words (the fake's tokens) is cut there
    and reported as 'length', as a real backend does.
    """

    name = "scripted"

    def __init__(self, config: ScriptedModelConfig | None = None):
        self.config = config or ScriptedModelConfig()
        #: The published policy version it "samples" with (0: none); `{version}` in a reply shows it.
        self.policy_version = 0

    def load_policy(self, ref) -> None:
        """Switch to a published version (`megaflow.model.weights`): one assignment, so never half done."""
        self.policy_version = max(self.policy_version, ref.version)

    def generate(self, request: ModelRequest) -> Completion:
        prompt_chars = sum(len(m.content) for m in request.messages)
        if prompt_chars > MAX_PROMPT_CHARS:
            raise ContextLengthError(f"prompt of {prompt_chars} chars exceeds {MAX_PROMPT_CHARS}")
        step = sum(1 for m in request.messages if m.role == "assistant")
        replies = self.config.replies
        version = self.policy_version  # read once: the whole reply comes from one version
        text = replies[min(step, len(replies) - 1)].replace("{step}", str(step))
        text = text.replace("{version}", str(version))
        if self.config.latency_s:
            if request.timeout_s is not None and self.config.latency_s > request.timeout_s:
                time.sleep(request.timeout_s)
                raise ModelUnavailableError(f"no answer within the call's {request.timeout_s:g}s deadline")
            time.sleep(self.config.latency_s)
        text, finish = _cap(text, request.sampling.max_tokens)
        words = text.split()
        calls = None
        if request.tools:
            parsed = parse_tool_calls(text)
            text, calls = parsed.content, parsed.calls or None
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=finish,
            token_ids=[len(w) for w in words],
            logprobs=[0.0] * len(words),
            usage=Usage(prompt_tokens=prompt_chars // 4, completion_tokens=len(words)),
            latency_s=self.config.latency_s,
            model=self.config.name,
            model_version=self.config.version,
            policy_version=version,
        )

    def close(self) -> None:
        pass


def _cap(text: str, max_tokens: int) -> tuple[str, str]:
    """Cut `text` after its `max_tokens`-th word, as a real model stops at its cap.

    Returns:
        The text, cut where the cap fell (its own spacing kept), and the finish reason:
        'length' when words were dropped, else 'stop'.
    """
    ends = [m.end() for m in _WORD.finditer(text)]
    if len(ends) <= max_tokens:
        return text, "stop"
    return text[: ends[max_tokens - 1]], "length"
