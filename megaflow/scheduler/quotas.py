"""Administrative quotas per user and project (tier 3 of concurrency control).

``max_concurrent`` is a semaphore (``quota:<scope>:<name>``) taken at admission
with the others; ``max_total`` counts the episodes ever admitted. Work over a quota
waits with a visible reason (``megaflow status``); raising the quota admits it.
"""

from __future__ import annotations

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Quota
from megaflow.db.sql import prepared, upsert
from megaflow.scheduler import semaphores

SCOPES = ("user", "project")


def set_quota(s: Session, scope: str, name: str, max_concurrent: int | None, max_total: int | None) -> None:
    if scope not in SCOPES:
        raise ValueError(f"quota scope must be one of {SCOPES}, not {scope!r}")
    for value, what in ((max_concurrent, "max_concurrent"), (max_total, "max_total")):
        if value is not None and value < 0:
            raise ValueError(f"{what} must be >= 0, not {value}")
    s.execute(upsert(s.connection(), Quota.__table__,
                     {"scope": scope, "name": name, "max_concurrent": max_concurrent, "max_total": max_total,
                      "admitted_total": 0}, ["scope", "name"], update=["max_concurrent", "max_total"]))
    semaphores.set_limit(s, semaphores.quota_key(scope, name), max_concurrent)


def quotas_of(s: Session, user: str, project: str) -> list:
    """The quotas over a user and a project (rows: scope, name, max_concurrent, max_total, admitted_total).

    Read at every admission, never cached (a changed quota applies at once): a statement
    prepared once (`megaflow.db.sql.prepared`), not an ORM query built each time.
    """
    conn = s.connection()
    return conn.execute(prepared(conn, "quotas.of", _select_quotas), {"user": user, "project": project}).all()


def _select_quotas(conn):
    q = Quota.__table__.c
    return select(q.scope, q.name, q.max_concurrent, q.max_total, q.admitted_total).where(or_(
        and_(q.scope == "user", q.name == bindparam("user")),
        and_(q.scope == "project", q.name == bindparam("project"))))


def concurrency_keys(quotas: list[Quota]) -> list[str]:
    return [semaphores.quota_key(q.scope, q.name) for q in quotas if q.max_concurrent is not None]


def count_admission(s: Session, quotas: list) -> Quota | None:
    """Count one more admitted episode against each total; returns the quota that is spent (nothing counted)."""
    counted = []
    for q in quotas:
        if q.max_total is None:
            continue
        ok = s.execute(update(Quota).where(Quota.scope == q.scope, Quota.name == q.name,
                                           Quota.admitted_total < Quota.max_total)
                       .values(admitted_total=Quota.admitted_total + 1)).rowcount == 1
        if not ok:
            for c in counted:
                s.execute(update(Quota).where(Quota.scope == c.scope, Quota.name == c.name)
                          .values(admitted_total=Quota.admitted_total - 1))
            return q
        counted.append(q)
    return None


def list_quotas(s: Session) -> list[dict]:
    usage = semaphores.usage(s, "quota:")
    return [{"scope": q.scope, "name": q.name, "max_concurrent": q.max_concurrent, "max_total": q.max_total,
             "running": usage.get(semaphores.quota_key(q.scope, q.name), (0, None))[0],
             "admitted_total": q.admitted_total}
            for q in s.execute(select(Quota).order_by(Quota.scope, Quota.name)).scalars()]
