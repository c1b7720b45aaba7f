"""The Celery app factory. No app exists until you ask for one."""

from __future__ import annotations

from celery import Celery
from celery.app.amqp import AMQP, Queues

from megaflow.config import Settings
from megaflow.deadlines import SOFT_GRACE_S, hop_hard_limit_s
from queues import topology

#: How many messages each pool's worker processes hold unacknowledged.
#: Long tasks (model calls, commands) take one at a time so none are hoarded.
PREFETCH = {"model": 1, "agent": 8, "env": 1}


class TopologyQueues(Queues):
    """Queues that Celery creates on the fly (``env.<host>``) get MegaFlow's arguments.

    Stock Celery would declare them without the dead-letter exchange, and RabbitMQ
    refuses a second declaration with other arguments (PRECONDITION_FAILED).
    """

    def new_missing(self, name):
        return topology.make_queue(name)


class TopologyAMQP(AMQP):
    queues_cls = TopologyQueues

    def as_task_v2(self, task_id, name, args=None, kwargs=None, *more, argsrepr=None, kwargsrepr=None, **options):
        # Celery's saferepr walks the arguments in Python (a tenth of a hop worker's
        # time, for the previous hop's result in every continuation). MegaFlow's
        # arguments are JSON (no cycles, no odd reprs): the builtin repr is enough.
        if argsrepr is None:
            argsrepr = _short_repr(args or (), self.argsrepr_maxsize)
        if kwargsrepr is None:
            kwargsrepr = _short_repr(kwargs or {}, self.kwargsrepr_maxsize)
        return super().as_task_v2(task_id, name, args, kwargs, *more, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
                                  **options)

    def _create_task_sender(self):
        # Celery asks kombu to declare the target queue on every publish; with
        # publish retries on, kombu wraps even a cached declaration in its retry
        # machinery (a tenth of a publish). Skip it when this connection already
        # declared the queue; a new connection starts with an empty cache.
        send = super()._create_task_sender()
        queues = self.queues

        def send_task_message(producer, name, message, queue=None, declare=None, **kwargs):
            if declare is None and queue is not None:
                q = queues[queue] if isinstance(queue, str) else queue
                conn = producer.connection
                if conn is not None and q.can_cache_declaration and hash(q) in conn.declared_entities:
                    declare = []
            return send(producer, name, message, queue=queue, declare=declare, **kwargs)

        return send_task_message


def _short_repr(value, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def make_app(settings: Settings | None = None, pool: str | None = None) -> Celery:
    """Build the MegaFlow Celery app.

    Args:
        settings: where the broker, database and result backend are; from the
            environment when omitted.
        pool: ``model``, ``agent`` or ``env`` for a worker's app (sets its queues
            and prefetch); None for a client.
    """
    settings = settings or Settings()
    # MegaFlowTask: poison messages are counted and capped (megaflow.delivery).
    app = Celery("megaflow", broker=settings.resolved_broker_url(), backend=settings.resolved_result_backend(),
                 amqp=TopologyAMQP, task_cls="megaflow.delivery:MegaFlowTask")
    conf = dict(
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Late acks + reject on worker loss: a hop being worked on when its worker
        # dies is redelivered, and the idempotency ledger makes the retry harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that fails (wrong arguments, a bug outside the hop's own containment)
        # is rejected, so RabbitMQ dead-letters its message instead of dropping it; a
        # hard time limit requeues it, and MegaFlowTask caps how often.
        task_acks_on_failure_or_timeout=False,
        worker_consumer="megaflow.delivery:DeadLetteringConsumer",
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_routes=(topology.route_task,),
        task_default_queue=topology.AGENT,
        task_default_exchange=topology.EXCHANGE.name,
        task_default_routing_key=topology.AGENT,
        task_create_missing_queues=True,
        task_queues=[topology.make_queue(p) for p in topology.POOLS],
        task_publish_retry=True,
        # Long enough to ride out a broker restart (~80 s in all) instead of failing the hop.
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 3},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_prefetch_multiplier=PREFETCH.get(pool or "", 4),
        worker_hijack_root_logger=False,
        # After a broker restart: let running hops finish (their acks fail, RabbitMQ
        # redelivers them, the ledger replays them) rather than cancel them — the
        # threads pools cannot cancel — and do not shrink the prefetch count: in our
        # chaos runs that left a reconnected worker idle until the broker dropped it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_prefetch_count_reduction=False,
        # A silent connection is found dead within ~30 s, not RabbitMQ's default minutes.
        broker_heartbeat=10,
        # Any task without its own limits (megaflow.deadlines sets them per task) stays
        # below the broker's consumer timeout too.
        task_soft_time_limit=hop_hard_limit_s(settings) - SOFT_GRACE_S,
        task_time_limit=hop_hard_limit_s(settings),
        result_expires=86400,
        result_chord_join_timeout=30.0,
        enable_utc=True,
        timezone="UTC",
    )
    if settings.resolved_broker_url().startswith(("amqp", "pyamqp")):
        # Publisher confirms: a hop's continuation is in RabbitMQ before the hop is
        # acknowledged. Without them a worker killed right after its parent acked
        # can lose the continuation still sitting in its socket buffer. A worker's task-event
        # connection turns them off (workers.common.WorkerConsumer: waiting for them there
        # stalled whole workers, issue #21 point 3).
        conf["broker_transport_options"] = {"confirm_publish": True}
    if settings.embedded:
        from megaflow.kombu_sqlite import TRANSPORT

        conf["broker_transport"] = TRANSPORT
    app.conf.update(conf)
    app.megaflow_settings = settings
    # Every message carries its publish time, so each hop's queue wait is recorded
    # (megaflow.hops.queue_wait). Celery's signals are process-wide: one handler,
    # however many apps this process makes.
    from celery.signals import before_task_publish

    from megaflow.hops.queue_wait import stamp

    before_task_publish.connect(stamp, weak=False, dispatch_uid="megaflow.queue_wait.stamp")
    from megaflow.hops import register

    register(app)
    return app
