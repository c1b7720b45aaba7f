"""The typed seam between hops: what a hop hands the episode's decision, and what a decision says.

A hop (provision, generate, exec, evaluate, release) returns a `HopResult`; the
episode task (``megaflow.episode``) reads it as ``prev``, decides, and records a
`Decision`: go to a next hop (`Next`), end (`Final`, the summary its chord
collects), or wait for room (``park``). Both cross RabbitMQ and the ledger as JSON
(`wire`), and are read back with `HopResult.received` / `Decision.parse`: no hop
reads another's dict keys.

A failed hop is still a result: `failure` builds it (redacted, capped), and the
decision ends the episode with its `ExitStatus`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from megaflow.db.states import ExitStatus
from megaflow.redact import redact_text

#: The hops an episode's decision can follow; ``start`` and ``admit`` are the
#: episode's first message (sent at submit, or again once admitted after waiting).
HopName = Literal["start", "admit", "provision", "generate", "exec", "evaluate", "release", "unknown"]
#: An infra failure carries no reward and is re-run by resume; an agent one is the agent's.
FailureKind = Literal["infra", "agent"]
#: How much of an error text a result carries (the rest is in the worker's log).
ERROR_CHARS = 2000


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The JSON form sent to the next task and kept in the ledger (unset fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class HopResult(_Wire):
    """What one hop did, as the episode's next decision reads it."""

    hop: HopName
    step: int = 0
    #: The env host that holds the episode's sandbox (env hops).
    host: str | None = None
    #: The command's exit code (exec).
    exit_code: int | None = None
    #: The reward evaluation computed (evaluate).
    reward: float | None = None
    #: Set when the hop failed: what went wrong (redacted), whose fault, and the exit status it ends with.
    error: str | None = None
    kind: FailureKind | None = None
    exit_status: ExitStatus | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @classmethod
    def received(cls, prev: Any) -> HopResult:
        """The previous hop's result as a message carried it, whatever it held.

        A malformed one (a hand-made message, a poisoned delivery's leftovers) must
        still reach the decision, which then ends the episode, rather than fail the
        task outside the decision's crash handling: a failed task would leave its
        episode running and its chord member would never return.
        """
        if isinstance(prev, HopResult):
            return prev
        raw = dict(prev) if isinstance(prev, dict) else {}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            try:
                step = int(raw.get("step") or 0)
            except (TypeError, ValueError):
                step = 0
            if not raw:
                return cls(hop="start", step=step)
            hop = raw.get("hop") if raw.get("hop") in HopName.__args__ else "unknown"
            error = raw.get("error") or f"malformed hop result {raw!r:.300} ({exc.error_count()} invalid fields)"
            status = raw.get("exit_status")
            status = ExitStatus(status) if status in ExitStatus.__members__.values() else ExitStatus.HOP_CRASHED
            return failure(hop, step, str(error), status)


def failure(hop: str, step: int, error: BaseException | str, exit_status: ExitStatus,
            kind: FailureKind = "infra", **fields) -> HopResult:
    """The one way to build a failed hop's result: the error text redacted and capped.

    Args:
        hop: The hop that failed (for a decision that crashed: the hop it followed).
        step: Its step.
        error: The exception, or a text saying what happened. It may quote a credential
            (a URL with a password, an API key in a header): always redacted here.
        exit_status: What the episode ends with.
        kind: ``infra`` (not the agent's doing) or ``agent``.
    """
    return HopResult(hop=hop if hop in HopName.__args__ else "unknown", step=step, error=error_text(error),
                     kind=kind, exit_status=exit_status, **fields)


def error_text(error: BaseException | str) -> str:
    """An error as an episode records it: ``Type: message``, redacted, capped at `ERROR_CHARS`."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return redact_text(text)[:ERROR_CHARS]


class Next(_Wire):
    """The next hop to send: `hop` at `step`, to `host`'s queue when the hop is bound to one."""

    hop: Literal["provision", "generate", "exec", "evaluate", "release"]
    step: int
    host: str | None = None
    #: Seconds the message waits on the broker first (a simulated service latency, `RunSpec.simulate`).
    delay: float | None = None


class Summary(_Wire):
    """An ended episode, as its group's chord collects it."""

    episode_id: str
    state: str
    reward: float | None = None
    exit_status: str | None = None


class Decision(_Wire):
    """What one decision of the episode task concluded: exactly one of `next`, `final`, `park`."""

    next: Next | None = None
    #: The episode has ended; this is its chord member's result.
    final: Summary | None = None
    #: No room to start now: the start message is parked in the episode's row and sent again on admission.
    park: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> Decision:
        if sum(x is not None and x is not False for x in (self.next, self.final, self.park)) != 1:
            raise ValueError("a decision is exactly one of next, final, park")
        return self

    @classmethod
    def parse(cls, raw: Any) -> Decision:
        return raw if isinstance(raw, Decision) else cls.model_validate(raw)
