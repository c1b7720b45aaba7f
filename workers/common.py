"""What every pool's worker shares: the app, its queues, its pool type and concurrency."""

from __future__ import annotations

import logging
import os
import sys

from celery import signals

from megaflow.app import make_app
from megaflow.config import Settings
from megaflow.bench import tasks as bench_tasks
from megaflow.delivery import DeadLetteringConsumer
from queues import topology
from queues.topology import POOL_DEFAULTS

log = logging.getLogger(__name__)


class WorkerConsumer(DeadLetteringConsumer):
    """The worker's consumer, whose task-event connection publishes without publisher confirms.

    Celery (5.7) registers the event connection with the consumer loop, which reads it
    to take the broker's heartbeats; a thread that publishes a task event with a
    confirm reads the same socket for its ack. Two readers of one py-amqp connection
    steal each other's frames: the publisher then waits for an ack that never comes,
    holding the event dispatcher's lock, and every other thread — the consumer loop
    too — blocks on that lock at its next event. No heartbeat goes out on either
    connection; RabbitMQ closes both ("missed heartbeats from client") and the acks
    of the held tasks fail (issue #21 point 3, docs/reliability.md). Events are for
    monitoring: one lost in a crash is harmless, so they need no confirm, and then
    only the loop reads that connection. Task publishes keep theirs (`make_app`).
    """

    def connection_for_write(self, url=None, heartbeat=None):
        # Celery's consumer asks for a write connection only for its event dispatcher.
        return self.ensure_connected(self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}))


def make_worker_app(pool: str, settings: Settings | None = None):
    """The Celery app of one pool, consuming only that pool's queues."""
    settings = settings or Settings()
    app = make_app(settings, pool=pool)
    app.conf.worker_consumer = f"{__name__}:WorkerConsumer"
    pool_type, concurrency = POOL_DEFAULTS[pool]
    if settings.embedded and pool == "agent":
        # SQLite allows one writer at a time; more decisions at once only queue on its lock.
        concurrency = 1
    app.conf.worker_pool = settings.worker_pool or pool_type
    if settings.worker_concurrency is not None:
        concurrency = settings.worker_concurrency
    app.conf.worker_concurrency = concurrency
    own = topology.pool_queues(pool, settings.host)
    if settings.worker_queue_names():
        # An explicit list (benchmarks use a private queue) replaces the pool's own.
        own = [topology.make_queue(q) for q in settings.worker_queue_names()]

    @signals.celeryd_after_setup.connect(weak=False)
    def _consume_own_queues(sender, instance, **kwargs):
        if instance.app is not app:
            return
        for queue in own:
            if queue.name not in app.amqp.queues:
                app.amqp.queues.add(queue)
        app.amqp.queues.select([q.name for q in own])
        _declare_dead_letters(app)
        log.info("%s worker on host %s consuming %s", pool, settings.host, [q.name for q in own])

    if pool in ("env", "model"):
        _check_at_start(app, settings, pool)
    if pool == "env":
        _reap_periodically(app, settings)
        _register_host(app, settings)
    _record_retries(app)
    _guard(app, settings)
    # The benchmarks time their floors on the pipeline's own workers; the library does not know them.
    bench_tasks.register(app)
    return app


def _check_at_start(app, settings: Settings, pool: str) -> None:
    """A worker whose required backends cannot work exits at once, code 3, with the reason on stderr.

    Otherwise it would take hops and retry them until their episodes fail. Env
    workers check ``MEGAFLOW_SANDBOX_BACKENDS``, model workers ``MEGAFLOW_MODEL_BACKENDS``.
    """

    @signals.worker_init.connect(weak=False)
    def _preflight(sender=None, **kwargs):
        if getattr(sender, "app", app) is not app:
            return
        from megaflow.preflight import PreflightError, check_model_proxy, check_model_types, check_sandbox_types

        try:
            if pool == "env":
                check_sandbox_types(settings, settings.required_sandboxes())
                check_model_proxy(settings)
            else:
                check_model_types(settings.required_models())
        except PreflightError as exc:
            # One line on stderr (the worker's log), then out before consuming anything.
            print(f"megaflow {pool} worker cannot start: {exc}", file=sys.stderr, flush=True)
            os._exit(3)


def _record_retries(app) -> None:
    """Record a hop's retry as a ``hop.retry`` event with its error, and log it at WARNING.

    Celery logs retries at INFO only; recorded, the reason a run makes no progress is
    what `megaflow run`'s live view shows when it stalls.
    """

    @signals.task_retry.connect(weak=False)
    def _retried(sender=None, request=None, reason=None, **kwargs):
        if sender is None or sender.app is not app:
            return
        args = list(getattr(request, "args", None) or [])
        subject = args[0] if args and isinstance(args[0], str) and len(args[0]) <= 32 else None
        exc = getattr(reason, "exc", None)
        error = (f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(reason))[:500]
        log.warning("%s retried (%s): %s", sender.name, subject, error)
        try:
            from megaflow.events import emit
            from megaflow.runtime import get_runtime

            rt = get_runtime(app)
            run_id = None
            if subject:
                try:
                    run_id = rt.refs(subject)[0]
                except LookupError:
                    pass
            with rt.session() as s:
                emit(s, "hop.retry", run_id, subject, {"task": sender.name, "error": error,
                                                        "retries": getattr(request, "retries", None)})
        except Exception:  # noqa: BLE001 - recording must never stop the retry itself
            log.debug("could not record the retry of %s", sender.name, exc_info=True)


def _guard(app, settings: Settings) -> None:
    """Credentials masked in every log line; time limits for the threads pools (Celery enforces none there)."""
    from megaflow.deadlines import task_time_limits
    from megaflow.redact import install_log_redaction
    from megaflow.watchdog import install

    install_log_redaction()
    if app.conf.worker_pool == "threads":
        install(app, task_time_limits(settings), exit_on_hard=settings.watchdog_exit)


def _register_host(app, settings: Settings) -> None:
    """Register this env host when its worker is ready, beat while it runs, say goodbye on exit.

    Joining admits waiting episodes at once: a new host gets work within seconds.
    Every live env worker also recovers dead hosts (`megaflow.scheduler.recovery`):
    their episodes move to live hosts, checked every ``heartbeat_s``.
    """
    from megaflow.runtime import get_runtime
    from megaflow.scheduler.recovery import RecoveryThread
    from megaflow.scheduler.registry import join, leave

    beats: list = []

    @signals.worker_ready.connect(weak=False)
    def _join(sender, **kwargs):
        if sender.app is not app:
            return
        beats.append(join(app, get_runtime(app)))
        beats.append(RecoveryThread(app, get_runtime(app), settings.heartbeat_s))
        beats[-1].start()
        _restart_cli_proxy(app, get_runtime(app))

    @signals.worker_shutdown.connect(weak=False)
    def _leave(sender, **kwargs):
        if sender.app is not app:
            return
        for beat in beats:
            beat.stop()
        leave(get_runtime(app))


def _restart_cli_proxy(app, rt) -> None:
    """A restarted env worker serves its parked CLI episodes again: their programs' calls, exits, deadlines.

    Otherwise its model proxy starts at the first CLI agent it launches (`megaflow.hops.cli_launch`).
    """
    from megaflow.hops import cli_proxy

    try:
        if cli_proxy.running_here(rt):
            cli_proxy.ensure(app, rt)
    except Exception:  # the worker still serves every other episode
        logging.getLogger(__name__).exception("the CLI agents' model proxy did not start")


def _reap_periodically(app, settings: Settings) -> None:
    """An env worker reaps its host every ``reap_interval_s`` and empties its warm pool on exit.

    A timer thread rather than Celery beat: beat is one more process to run, and the
    reaping belongs to the host, so the worker that owns the host does it.
    """
    from megaflow.reaper import ReaperThread
    from megaflow.runtime import get_runtime

    timers: list[ReaperThread] = []

    @signals.worker_ready.connect(weak=False)
    def _start_reaper(sender, **kwargs):
        if sender.app is not app:
            return
        timers.append(ReaperThread(get_runtime(app), settings.reap_interval_s))
        timers[-1].start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop_reaper(sender, **kwargs):
        if sender.app is not app:
            return
        for timer in timers:
            timer.stop(timeout=30)
        get_runtime(app).close()  # destroys the idle pooled sandboxes


def _declare_dead_letters(app) -> None:
    """Declare megaflow.dlx and megaflow.dead, so rejected messages are kept, not dropped."""
    with app.connection_for_write() as conn:
        topology.dead_letter_queue()(conn.default_channel).declare()
