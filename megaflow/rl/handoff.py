"""Ready groups handed to trainers, exactly once: PostgreSQL LISTEN/NOTIFY and a claims table.

How a batch reaches a consumer:

* **Ready.** A group is ready when its chord's callback has closed it (status
  ``finished``, advantages written). The same transaction notifies the run's
  channel (`megaflow.scheduler.closing.notify_ready`), and so does the run's end.
  A consumer waits on that channel: no polling loop.
* **Claimed.** A consumer claims G ready groups by inserting their rows into
  ``rl_handoffs`` under one ``batch_id`` and its consumer key (the primary key on
  the group makes two consumers' claims disjoint).
* **Alive.** A consumer holds a session advisory lock on its key for as long as it
  lives. A claim whose key's lock is free belongs to a dead consumer (killed, its
  connection gone): the next consumer to look takes that batch over whole, with its
  id, before any new group. A consumer that waits while others hold batches watches
  their locks (`megaflow.rl.watch`): a death wakes it like a closed group.
* **Acknowledged.** ``Batch.ack()`` stamps the rows; a stamped group is never
  handed out again.

The stream ends when the run has ended, every group has been handed out, and no
other consumer holds a batch it has not acknowledged (it might yet die with it; a
consumer's own unacknowledged batches do not hold its stream). The groups left when
the run ends form a last, smaller batch. Why PostgreSQL and not a
queue per run: the claim, its owner's liveness and the acknowledgement are rows and
locks in the database that already holds the groups, and the notification is sent
by the very transaction that closes the group, so nothing is published before the
rows it points at exist, and nothing is lost if a worker dies after the commit.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from functools import partial
from typing import Self

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from megaflow.db.engine import session_scope
from megaflow.db.listen import Listener
from megaflow.db.models import RLHandoff, RolloutGroup, Run, new_id, utcnow
from megaflow.errors import MegaFlowError
from megaflow.export import ChatTokenizer
from megaflow.rl.batches import Batch, as_tokenizer, assemble
from megaflow.rl.watch import LOCK_SPACE, DeathWatch
from megaflow.scheduler.closing import ready_channel

log = logging.getLogger(__name__)

ENDED = ("finished", "cancelled")


class HandoffLostError(MegaFlowError, RuntimeError):
    """The batch was taken over by another consumer (this one was taken for dead)."""


def batch_size(run_id: str, rl: dict | None, groups_per_batch: int | None) -> int:
    """G: as asked, else the run's ``rl.groups_per_batch``.

    Raises:
        ValueError: G < 1, or none given for a run without ``rl`` settings, or G larger
            than a bounded run's ``rl.groups_per_batch``: its admission holds the groups
            past each boundary until the trainer publishes, so such a batch would wait forever.
    """
    rl = rl or {}
    per_step = rl.get("groups_per_batch")
    if groups_per_batch is None:
        if per_step is None:
            raise ValueError(f"run {run_id} has no rl settings: give groups_per_batch (--groups)")
        return per_step
    if groups_per_batch < 1:
        raise ValueError(f"groups_per_batch must be at least 1, not {groups_per_batch}")
    bounded = rl and (rl.get("mode") == "sync" or rl.get("max_staleness") is not None)
    if bounded and groups_per_batch > per_step:
        raise ValueError(f"groups_per_batch {groups_per_batch} is more than run {run_id}'s rl.groups_per_batch "
                         f"{per_step}: its staleness bound holds back the groups such a batch waits for")
    return groups_per_batch


class BatchStream:
    """An iterator of a run's `Batch`es for one consumer; close it (or use ``with``) when done.

    Args:
        db_url: The state database (PostgreSQL).
        run_id: The run.
        groups_per_batch: G, the groups in every batch but the run's last; default: the
            run's ``rl.groups_per_batch``.
        tokenizer: For turns whose backend recorded no token ids: a `ChatTokenizer`
            (e.g. `megaflow.export.HFChatTokenizer`) or a model name.
        timeout_s: Longest wait for the next batch; None waits as long as the run runs.

    Raises:
        ValueError: the database is not PostgreSQL, or G does not suit the run (`batch_size`).
        LookupError: no such run.
    """

    def __init__(self, db_url: str, run_id: str, groups_per_batch: int | None = None,
                 tokenizer: ChatTokenizer | str | None = None, timeout_s: float | None = None):
        if not db_url.startswith("postgresql"):
            raise ValueError("client.batches needs PostgreSQL (LISTEN/NOTIFY, advisory locks), not SQLite: "
                             "run on PostgreSQL, or export the run instead")
        with session_scope(db_url) as s:
            spec = s.execute(select(Run.spec).where(Run.id == run_id)).scalar()
        if spec is None:
            raise LookupError(f"no run {run_id}")
        self.db_url, self.run_id = db_url, run_id
        self.g = batch_size(run_id, spec.get("rl"), groups_per_batch)
        self.tokenizer = as_tokenizer(tokenizer)
        self.timeout_s = timeout_s
        # One connection of our own, outside any pool: it listens, and its advisory
        # lock says this consumer lives. It dies with the process, and the lock with it.
        self._listener = Listener(db_url, ready_channel(run_id))
        with self._listener.connection.cursor() as cur:
            while True:  # a random key; another if a live consumer holds it
                self.key = random.randrange(1, 2**31)
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, self.key))
                if cur.fetchone()[0]:
                    break
        self._watch = DeathWatch(db_url, ready_channel(run_id))
        self._closed = False

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            self._drain()
            claim = self._claim()
            if claim == "end":
                self.close()
                raise StopIteration
            if claim is not None:
                batch_id, group_ids, handouts = claim
                with session_scope(self.db_url) as s:
                    batch = assemble(s, self.run_id, batch_id, group_ids, self.tokenizer, handouts)
                batch._ack = partial(self._ack, batch_id, len(group_ids))
                return batch
            # Others hold batches: should one die, its batch is ours to take, at once.
            self._watch.watch(self._other_holders())
            self._wait(deadline)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening; batches taken and not acknowledged go to the next consumer."""
        if not self._closed:
            self._closed = True
            self._watch.close()
            self._listener.close()

    # -- waiting --------------------------------------------------------------------

    def _drain(self) -> None:
        self._listener.drain()

    def _wait(self, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"no batch of run {self.run_id} was ready within {self.timeout_s}s")
        self._listener.wait(left)

    # -- claiming -------------------------------------------------------------------

    def _claim(self):
        """A batch to hand out — ``(batch_id, group_ids, handouts)`` — or "end", or None (wait)."""
        while True:
            try:
                with session_scope(self.db_url) as s:
                    return self._take_over(s) or self._claim_ready(s)
            except IntegrityError:
                # Another consumer claimed one of the same groups first: look again.
                continue

    def _take_over(self, s):
        """A batch whose consumer died, now ours; None when there is none."""
        h = RLHandoff
        held = s.execute(select(h.batch_id, h.consumer).where(
            h.run_id == self.run_id, h.acked_at.is_(None), h.consumer != self.key).distinct()).all()
        for batch_id, consumer in held:
            # Free lock = dead consumer. Taking it (until this transaction ends) also
            # keeps two consumers from taking the same batch over at once.
            if not s.execute(select(func.pg_try_advisory_xact_lock(LOCK_SPACE, consumer))).scalar():
                continue
            rows = s.execute(update(h).where(h.batch_id == batch_id, h.consumer == consumer, h.acked_at.is_(None))
                             .values(consumer=self.key, handouts=h.handouts + 1, claimed_at=utcnow())
                             .returning(h.group_id, h.handouts)).all()
            if rows:
                log.info("batch %s of run %s: its consumer died; handed out again", batch_id, self.run_id)
                # In the order it was first handed out in: the order the groups closed.
                ids = list(s.execute(select(RolloutGroup.id).where(RolloutGroup.id.in_([g for g, _ in rows]))
                                     .order_by(RolloutGroup.finished_at, RolloutGroup.index)).scalars())
                return batch_id, ids, max(n for _, n in rows)
        return None

    def _claim_ready(self, s):
        # The run's status first: a run seen ended has all its groups closed, so the
        # next statement sees every one of them.
        ended = s.execute(select(Run.status).where(Run.id == self.run_id)).scalar() in ENDED
        taken = select(RLHandoff.group_id).where(RLHandoff.run_id == self.run_id)
        ready = list(s.execute(select(RolloutGroup.id).where(
            RolloutGroup.run_id == self.run_id, RolloutGroup.status == "finished", RolloutGroup.id.not_in(taken))
            .order_by(RolloutGroup.finished_at, RolloutGroup.index).limit(self.g)).scalars())
        if len(ready) < self.g and not (ended and ready):
            # The end, once no other consumer holds a batch it might yet die with.
            return "end" if ended and not self._other_holders(s) else None
        batch_id, now = new_id(), utcnow()
        s.execute(insert(RLHandoff), [{"group_id": g, "run_id": self.run_id, "batch_id": batch_id,
                                       "consumer": self.key, "handouts": 1, "claimed_at": now} for g in ready])
        return batch_id, ready, 1

    def _other_holders(self, s=None) -> list[int]:
        """Keys of the other consumers holding unacknowledged batches of the run."""
        if s is None:
            with session_scope(self.db_url) as own:
                return self._other_holders(own)
        h = RLHandoff
        return list(s.execute(select(h.consumer).where(
            h.run_id == self.run_id, h.acked_at.is_(None), h.consumer != self.key).distinct()).scalars())

    def _ack(self, batch_id: str, n: int) -> None:
        h = RLHandoff
        with session_scope(self.db_url) as s:
            done = s.execute(update(h).where(h.batch_id == batch_id, h.consumer == self.key, h.acked_at.is_(None))
                             .values(acked_at=utcnow())).rowcount
            if done == n:
                # Consumers waiting for the run's last batches to be acknowledged may end now.
                s.execute(select(func.pg_notify(ready_channel(self.run_id), "acked")))
                return
            mine = s.execute(select(func.count()).select_from(h).where(
                h.batch_id == batch_id, h.consumer == self.key)).scalar()
        if done == 0 and mine == n:
            return  # acknowledged before: nothing changes
        raise HandoffLostError(f"batch {batch_id} was handed to another consumer (this one was taken for dead); "
                               "skip this step")

