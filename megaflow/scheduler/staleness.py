"""Bounded staleness: how far a run's generation may run ahead of its trainer.

A run with an ``rl`` block is cut into batches of `groups_per_batch` groups (by task
order). The trainer turns batch b into version v0 + b + 1, v0 being the policy's
version when the run was submitted. With bound k (0 in ``sync`` mode, `max_staleness`
in ``async``), an episode of batch b is admitted only once version v0 + b - k is
published: generation is never more than k versions ahead of the trainer, as
AReaL's admission control does. In sync mode the run thus pauses at each boundary
until the trainer publishes. A publish admits the episodes it unblocks
(`admission.admit_published`), so nothing polls.

Each turn is then sampled with the newest version the model worker could switch to
at its start; the model hop refuses one whose weights lag the newest by more than
k (`turn_within`). An episode admitted in time but still running when the trainer
moves on finishes with the newer weights, each turn carrying its own version: see
docs/rl.md, "Staleness", for why not abort and resample.
"""

from __future__ import annotations

import threading

from sqlalchemy import select
from sqlalchemy.orm import Session

from megaflow.db.models import RolloutGroup, Run
from megaflow.model import policy as policies

#: The wait reason of an episode held for a policy version starts with this.
POLICY = "policy"

_start_versions: dict[str, int] = {}
_lock = threading.Lock()


def need(start_version: int, group_index: int, groups_per_batch: int, bound: int) -> int:
    """The version that must be published before an episode of group `group_index` starts."""
    return start_version + group_index // groups_per_batch - bound


def admissible(newest: int, needed: int) -> bool:
    return newest >= needed


def turn_within(newest: int, version: int | None, bound: int | None) -> bool:
    """Whether a turn sampled with `version` while `newest` is published respects the bound."""
    if bound is None or version is None:
        return True
    return newest - version <= bound


def reason(policy: str, needed: int) -> str:
    return f"{POLICY} {policy}: waiting for version {needed}"


def rl_claim(rl) -> dict | None:
    """What admission keeps of a run's ``rl`` block (None: no bound, admission never waits)."""
    if rl is None or rl.bound is None:
        return None
    return {"policy": rl.policy, "bound": rl.bound, "groups_per_batch": rl.groups_per_batch}


def start_version(s: Session, run_id: str, policy: str) -> int:
    """The policy's version when the run was submitted (cached: it never changes)."""
    with _lock:
        hit = _start_versions.get(run_id)
    if hit is None:
        created = s.execute(select(Run.created_at).where(Run.id == run_id)).scalar()
        hit = policies.version_at(s, policy, created) if created is not None else 0
        with _lock:
            if len(_start_versions) > 4096:
                _start_versions.clear()
            _start_versions[run_id] = hit
    return hit


def needed_for(s: Session, run_id: str, group_id: str, rl: dict) -> int:
    """The version an episode of `group_id` waits for (`need`, read from the rows)."""
    index = s.execute(select(RolloutGroup.index).where(RolloutGroup.id == group_id)).scalar() or 0
    return need(start_version(s, run_id, rl["policy"]), index, rl["groups_per_batch"], rl["bound"])
