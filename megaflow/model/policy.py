"""Published policy versions: recording one, reading the newest, hearing of new ones.

A trainer publishes a checkpoint (`Client.publish_policy`): a row of
``policy_versions`` gets the policy's next version number, and on PostgreSQL a
``NOTIFY megaflow_policy`` in the same transaction tells every listening model
worker at commit. Model workers switch between requests (`megaflow.model.weights`).

Versions are per policy name, from 1; version 0 means the weights the run's model
config names (nothing published yet). Concurrent publishers get distinct versions:
the number is computed in the insert itself, and a publisher that collides on the
primary key (it read the same maximum) tries again.

Without PostgreSQL (SQLite, the embedded stack) nothing is pushed: a model worker
reads the newest version before each request instead and switches then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, literal
from sqlalchemy import select as sql_select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from megaflow.db.models import PolicyVersion, utcnow

log = logging.getLogger(__name__)

#: The PostgreSQL channel publishers notify and model workers listen on.
CHANNEL = "megaflow_policy"
KINDS = ("full", "lora")
#: How often a publisher colliding with another retries.
PUBLISH_TRIES = 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class PolicyError(ValueError):
    """A checkpoint that cannot be published (missing, or not what its kind says)."""


@dataclass(frozen=True)
class PolicyRef:
    """One published version: what a model worker loads."""

    policy: str
    version: int
    path: str
    kind: str = "full"

    def wire(self) -> str:
        return json.dumps({"policy": self.policy, "version": self.version, "path": self.path, "kind": self.kind})

    @classmethod
    def parse(cls, payload: str) -> PolicyRef:
        d = json.loads(payload)
        return cls(policy=str(d["policy"]), version=int(d["version"]), path=str(d["path"]), kind=str(d["kind"]))


def check_checkpoint(path: str, kind: str) -> str:
    """The absolute path of a checkpoint that looks like its kind says.

    full: a ``save_pretrained`` directory (``config.json`` and weights) or one state-dict
    file (``.safetensors``, ``.bin``, ``.pt``); lora: a PEFT adapter directory
    (``adapter_config.json`` and ``adapter_model.*``).

    Raises:
        PolicyError: it does not exist, or does not look like a `kind` checkpoint.
    """
    if kind not in KINDS:
        raise PolicyError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise PolicyError(f"checkpoint {path} does not exist")
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if kind == "lora":
        if "adapter_config.json" not in files or not any(f.startswith("adapter_model.") for f in files):
            raise PolicyError(f"{path} is not a PEFT LoRA adapter: it needs adapter_config.json and "
                              "adapter_model.safetensors (PeftModel.save_pretrained writes both)")
        return path
    if os.path.isfile(path):
        if not path.endswith(_WEIGHT_SUFFIXES):
            raise PolicyError(f"{path} is not a state-dict file ({', '.join(_WEIGHT_SUFFIXES)})")
        return path
    if "adapter_config.json" in files:
        raise PolicyError(f"{path} is a LoRA adapter: publish it with kind 'lora'")
    if "config.json" not in files or not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise PolicyError(f"{path} is not a full checkpoint: it needs config.json and weights "
                          "(model.safetensors; save_pretrained writes both)")
    return path


def publish(session_factory, path: str, *, kind: str = "full", policy: str = "default",
            meta: dict | None = None) -> PolicyRef:
    """Record `path` as `policy`'s next version and notify model workers at commit.

    Args:
        session_factory: Opens a committing session (``Client.session``); each try has its own.

    Raises:
        PolicyError: the checkpoint is not valid; nothing was recorded.
    """
    path = check_checkpoint(path, kind)
    error: Exception | None = None
    for _ in range(PUBLISH_TRIES):
        try:
            with session_factory() as s:
                lock(s, policy)
                version = _insert_next(s, policy, path, kind, meta)
                ref = PolicyRef(policy=policy, version=version, path=path, kind=kind)
                if s.get_bind().dialect.name == "postgresql":
                    # Delivered at commit, to every session listening: no worker polls.
                    s.execute(sql_select(func.pg_notify(CHANNEL, ref.wire())))
            return ref
        except (IntegrityError, OperationalError) as exc:  # a concurrent publisher took this number
            error = exc
    raise RuntimeError(f"could not record a version of policy {policy!r} after {PUBLISH_TRIES} tries: {error}")


def lock(s: Session, policy: str, shared: bool = False) -> None:
    """Order a publication against admission's check of a policy (PostgreSQL; SQLite has one writer anyway).

    Admission reads the newest version and parks an episode in one transaction holding
    this lock shared; a publisher records its version holding it exclusive. So a
    publisher either commits before the check (which then sees its version) or after the
    park (and then finds the parked episode to admit): no wake-up is lost between them.
    """
    if s.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.blake2b(f"megaflow-policy:{policy}".encode(), digest_size=8).digest(), "big",
                         signed=True)
    fn = func.pg_advisory_xact_lock_shared if shared else func.pg_advisory_xact_lock
    s.execute(sql_select(fn(key)))


def _insert_next(s: Session, policy: str, path: str, kind: str, meta: dict | None) -> int:
    t = PolicyVersion.__table__
    following = sql_select(func.coalesce(func.max(t.c.version), 0) + 1).where(t.c.policy == policy).scalar_subquery()
    return int(s.execute(insert(t).from_select(["policy", "version", "path", "kind", "meta", "created_at"], sql_select(
        literal(policy), following, literal(path), literal(kind), literal(meta, type_=t.c.meta.type),
        literal(utcnow(), type_=t.c.created_at.type))).returning(t.c.version)).scalar_one())


def newest(s: Session, policy: str) -> PolicyRef | None:
    """The newest published version of `policy`, or None before any."""
    row = s.execute(sql_select(PolicyVersion).where(PolicyVersion.policy == policy)
                    .order_by(PolicyVersion.version.desc()).limit(1)).scalar()
    return None if row is None else PolicyRef(policy=row.policy, version=row.version, path=row.path, kind=row.kind)


def newest_version(s: Session, policy: str) -> int:
    """The newest version number of `policy`; 0 before any."""
    return int(s.execute(sql_select(func.max(PolicyVersion.version)).where(PolicyVersion.policy == policy))
               .scalar() or 0)


def version_at(s: Session, policy: str, when) -> int:
    """The newest version of `policy` published at or before `when`; 0 if none."""
    return int(s.execute(sql_select(func.max(PolicyVersion.version)).where(
        PolicyVersion.policy == policy, PolicyVersion.created_at <= when)).scalar() or 0)


def versions(s: Session, policy: str | None = None) -> list[PolicyVersion]:
    """Published versions, newest first; all policies unless one is named."""
    q = sql_select(PolicyVersion).order_by(PolicyVersion.policy, PolicyVersion.version.desc())
    if policy is not None:
        q = q.where(PolicyVersion.policy == policy)
    return list(s.execute(q).scalars())


class Listener:
    """A thread hearing published versions on PostgreSQL (LISTEN), calling `on_publish` with each.

    After a lost connection it reconnects and calls `on_reconnect` (read what was
    missed). The one-second wait on the socket only lets `stop()` be noticed: nothing
    is read from the database while no notification comes.
    """

    def __init__(self, db_url: str, on_publish: Callable[[PolicyRef], None],
                 on_reconnect: Callable[[], None] | None = None):
        self.db_url = db_url
        self.on_publish = on_publish
        self.on_reconnect = on_reconnect
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="megaflow-policy-listener", daemon=True)

    @staticmethod
    def supported(db_url: str) -> bool:
        return db_url.startswith("postgresql")

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self._listen(catch_up=not first)
            except Exception:
                log.warning("policy listener lost its connection; reconnecting", exc_info=True)
                self._stop.wait(1.0)
            first = False

    def _listen(self, catch_up: bool) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.db_url, poolclass=NullPool)
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
            self.ready.set()
            if catch_up and self.on_reconnect is not None:
                self.on_reconnect()
            while not self._stop.is_set():
                if select.select([conn], [], [], 1.0)[0]:
                    conn.poll()
                    while conn.notifies:
                        note = conn.notifies.pop(0)
                        try:
                            self.on_publish(PolicyRef.parse(note.payload))
                        except Exception:
                            log.exception("switching to a published policy failed: %s", note.payload)
        finally:
            raw.close()
            engine.dispose()
