"""What a trainer receives: a `Batch` of complete rollout groups, one `TrainEpisode` per episode.

A batch is plain data (dataclasses of lists and numbers; ``to_dict()`` for JSON, TRL,
verl and the like) plus ``ack()``. It is made from the rows the episodes left
(`assemble`): the per-turn token ids and the flat sequence come from the same
`megaflow.export.trainer_row` the Parquet export uses, so a batch and an export of
the same run agree token for token.

Episodes that ended without a verdict (``infra_failed``, ``cancelled``) have no
reward and no advantage (`megaflow.scheduler.closing.close_group` leaves them
out of the group's statistics), so they are dropped from the batch and listed in
``Batch.dropped`` with the reason: a trainer must never take a platform failure
for a bad answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode, Step, TaskInstance
from megaflow.export import ChatTokenizer, HFChatTokenizer, trainer_row


class MissingTokensError(ValueError):
    """An episode's token ids cannot be known: the backend recorded none and no tokenizer was given."""


class PromptDriftError(MissingTokensError):
    """A turn's recorded prompt does not extend the turns before it, and no tokenizer was given.

    The model saw an earlier reply re-tokenized from its text (ids other than those it
    sampled, or another end-of-turn id), so no one flat sequence is what the model saw.
    """


@dataclass
class TrainEpisode:
    """One episode as a trainer consumes it.

    Per turn (one model call each): ``prompt_token_ids[i]`` are the ids the turn adds
    before the model's reply (its new messages, templated); ``completion_token_ids[i]``
    the sampled ids; ``completion_logprobs[i]`` the sampling policy's logprob of each
    (None where the backend returned none); ``policy_versions[i]`` the published policy
    version that sampled it (None before any was published).

    The flat sequence: ``input_ids`` is every turn's prompt then completion ids;
    ``loss_mask`` is 1 on completion (model) tokens only; ``behaviour_logprobs`` is
    aligned with ``input_ids`` (0.0 where the mask is 0), or None when some turn has
    no logprobs.
    """

    episode_id: str
    group_id: str
    instance_id: str
    sample_index: int
    exit_status: str | None
    reward: float
    advantage: float
    prompt_token_ids: list[list[int]]
    completion_token_ids: list[list[int]]
    completion_logprobs: list[list[float] | None]
    policy_versions: list[int | None]
    input_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float] | None


@dataclass
class Batch:
    """Complete rollout groups handed to one consumer; ``ack()`` once the trainer has used them.

    Attributes:
        run_id: The run.
        batch_id: Stable across hand-outs: a batch handed out again (its consumer died
            before ``ack``) keeps its id and its groups.
        group_ids: The groups, each complete (its chord's callback wrote its advantages).
        episodes: Every episode of those groups that has a reward (see ``dropped``).
        dropped: Episodes left out, each ``{"episode_id", "group_id", "state",
            "exit_status", "reason"}``.
        handouts: 1 the first time; more when earlier consumers took it and died.
    """

    run_id: str
    batch_id: str
    group_ids: list[str]
    episodes: list[TrainEpisode]
    dropped: list[dict] = field(default_factory=list)
    handouts: int = 1
    _ack: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def ack(self) -> None:
        """Mark the batch used: it is never handed out again.

        Raises:
            megaflow.rl.handoff.HandoffLostError: another consumer took the batch over
                (this one was taken for dead); do not count this step.
        """
        if self._ack is None:
            raise RuntimeError("this batch was not handed out by client.batches(); there is nothing to acknowledge")
        self._ack()

    def to_dict(self) -> dict:
        """The batch as JSON-ready data (no ``ack``)."""
        # Not dataclasses.asdict(self): it would deep-copy the ack (and the stream behind it).
        return {"run_id": self.run_id, "batch_id": self.batch_id, "group_ids": list(self.group_ids),
                "episodes": [dataclasses.asdict(e) for e in self.episodes],
                "dropped": [dict(d) for d in self.dropped], "handouts": self.handouts}

    def __len__(self) -> int:
        return len(self.episodes)


def as_tokenizer(tokenizer: ChatTokenizer | str | None) -> ChatTokenizer | None:
    """A `ChatTokenizer` from a model name, a tokenizer object or None."""
    if tokenizer is None or hasattr(tokenizer, "turn_ids"):
        return tokenizer
    return HFChatTokenizer(tokenizer)


def train_episode(ep, ti, steps: list, tokenizer: ChatTokenizer | None = None) -> TrainEpisode:
    """One finished episode's rows as a `TrainEpisode`.

    Raises:
        PromptDriftError: a recorded prompt does not extend the turns before it (no tokenizer).
        MissingTokensError: a turn's prompt or completion ids are unknown (nothing
            recorded, no tokenizer), or its logprobs do not match its token ids.
    """
    row = trainer_row(ep, ti, steps, tokenizer=tokenizer)
    turns = [s for s in steps if s.completion is not None]
    if row["input_ids"] is None:
        recorded = all(getattr(s, "prompt_token_ids", None) is not None and s.token_ids is not None for s in turns)
        raise (PromptDriftError if recorded else MissingTokensError)(
            f"episode {ep.id}: " + ("a recorded prompt does not extend the turns before it" if recorded else
                                    "the model backend recorded no token ids for some turn")
            + "; pass tokenizer= (a model name or an HFChatTokenizer) to client.batches(), or --tokenizer")
    logprobs = row["completion_logprobs"]
    for i, (ids, lp) in enumerate(zip(row["completion_token_ids"], logprobs)):
        if lp is not None and len(lp) != len(ids):
            raise MissingTokensError(f"episode {ep.id} turn {i}: {len(lp)} logprobs for {len(ids)} completion tokens")
    behaviour = None
    if all(lp is not None for lp in logprobs):
        behaviour = []
        for p, lp in zip(row["prompt_token_ids"] or [[]] * len(logprobs), logprobs):
            behaviour += [0.0] * len(p) + [float(x) for x in lp]
    return TrainEpisode(
        episode_id=ep.id, group_id=ep.group_id, instance_id=ti.instance_id, sample_index=ep.sample_index,
        exit_status=ep.exit_status, reward=float(ep.reward if ep.reward is not None else 0.0),
        advantage=float(ep.advantage if ep.advantage is not None else 0.0),
        prompt_token_ids=row["prompt_token_ids"] or [], completion_token_ids=row["completion_token_ids"],
        completion_logprobs=logprobs, policy_versions=[getattr(s, "policy_version", None) for s in turns],
        input_ids=row["input_ids"], loss_mask=row["loss_mask"], behaviour_logprobs=behaviour)


def assemble(s: Session, run_id: str, batch_id: str, group_ids: list[str],
             tokenizer: ChatTokenizer | None = None, handouts: int = 1) -> Batch:
    """Read the groups' current episodes and their steps, and make the batch (without ``ack``).

    Episodes without a reward are dropped (see the module docstring), and so are those
    whose recorded prompts drift from the sampled ids (`PromptDriftError`) when no
    tokenizer was given; each is listed in ``Batch.dropped`` with the reason.

    Raises:
        MissingTokensError: the backend recorded no token ids and no tokenizer was given.
    """
    rows = s.execute(select(Episode, TaskInstance).join(TaskInstance, TaskInstance.id == Episode.task_instance_id)
                     .where(Episode.group_id.in_(group_ids), Episode.superseded_by.is_(None))).all()
    order = {g: i for i, g in enumerate(group_ids)}
    rows.sort(key=lambda r: (order[r[0].group_id], r[0].sample_index))
    steps: dict[str, list] = {ep.id: [] for ep, _ in rows}
    for step in s.execute(select(Step).where(Step.episode_id.in_(list(steps)))
                          .order_by(Step.episode_id, Step.index)).scalars():
        steps[step.episode_id].append(step)
    episodes, dropped = [], []
    for ep, ti in rows:
        if ep.state not in states.DONE:
            dropped.append({"episode_id": ep.id, "group_id": ep.group_id, "state": ep.state,
                            "exit_status": ep.exit_status, "reason": "no reward: the episode ended without a verdict"})
            continue
        try:
            episodes.append(train_episode(ep, ti, steps[ep.id], tokenizer))
        except PromptDriftError as exc:
            # One episode's re-tokenized history must not stop the trainer: left out, said why.
            dropped.append({"episode_id": ep.id, "group_id": ep.group_id, "state": ep.state,
                            "exit_status": ep.exit_status, "reason": str(exc)})
    return Batch(run_id=run_id, batch_id=batch_id, group_ids=list(group_ids), episodes=episodes,
                 dropped=dropped, handouts=handouts)
