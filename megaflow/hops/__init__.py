"""Celery tasks: the hops of an episode and the group/run callbacks."""

from __future__ import annotations

from celery import Celery
from sqlalchemy.exc import InterfaceError, OperationalError


def register(app: Celery) -> None:
    """Register every MegaFlow task on `app` under its stable name."""
    from megaflow.hops.env_hop import evaluate_task, exec_task, provision_task, release_task
    from megaflow.hops.episode import episode_task
    from megaflow.hops.groups import group_done_task, group_start_task, run_done_task
    from megaflow.hops.model_hop import generate_task

    bound = {
        "megaflow.episode": episode_task,
        "megaflow.group.start": group_start_task,
        "megaflow.group.done": group_done_task,
        "megaflow.run.done": run_done_task,
        "megaflow.hop.generate": generate_task,
        "megaflow.hop.provision": provision_task,
        "megaflow.hop.exec": exec_task,
        "megaflow.hop.evaluate": evaluate_task,
        "megaflow.hop.release": release_task,
    }
    from megaflow.deadlines import task_time_limits

    limits = task_time_limits(app.megaflow_settings)
    for name, fn in bound.items():
        soft, hard = limits[name]
        # A lost database connection (a restart, a failover) is an infra hiccup:
        # retry the hop; the ledger makes the retry harmless. Time limits keep every
        # task below the broker's consumer timeout (megaflow.deadlines).
        # shared=False: a task registered by another app of this process (other settings,
        # other limits) must not stand in for this app's.
        app.task(name=name, bind=True, autoretry_for=(OperationalError, InterfaceError), retry_backoff=True,
                 retry_backoff_max=30, retry_jitter=True, max_retries=20, soft_time_limit=soft,
                 time_limit=hard, shared=False)(fn)
