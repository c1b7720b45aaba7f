"""All MegaFlow exceptions, grouped by what the caller should do.

* `InfraError`: the platform failed (sandbox died, model server down). Retry with
  backoff; if retries run out the episode ends as ``infra_failed`` and is never
  counted as done.
* `AgentError`: the agent or its input is at fault (bad action, prompt too long).
  Not retried; the episode ends ``failed`` with the reason recorded.
* `SpecError`: a user's spec is invalid; refused before anything is queued.
"""

from __future__ import annotations


class MegaFlowError(Exception):
    """Root of every MegaFlow exception."""


class SpecError(MegaFlowError, ValueError):
    """An invalid run spec or task set; nothing was queued."""


class InfraError(MegaFlowError):
    """A platform failure: worth retrying."""


class AgentError(MegaFlowError):
    """A failure of the agent or its input: retrying gives the same result."""


class SandboxError(InfraError):
    """The sandbox backend failed."""


class SandboxClosedError(SandboxError):
    """The sandbox was already closed."""


class SandboxNotFoundError(SandboxError, LookupError):
    """No sandbox with that id exists any more."""


class ModelError(MegaFlowError):
    """Base for model-service failures."""


class ModelUnavailableError(ModelError, InfraError, ConnectionError):
    """The model server refused, timed out or answered 5xx: retry."""


class ContextLengthError(ModelError, AgentError, ValueError):
    """The prompt does not fit the model's context: the episode ends."""


class MalformedResponseError(ModelError, InfraError, ValueError):
    """The server answered something that is not a valid completion."""


class RateLimitedError(ModelError, InfraError):
    """A tier-1 limit (requests/s, tokens/s, in flight) says wait; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
