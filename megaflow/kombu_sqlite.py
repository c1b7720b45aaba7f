"""The embedded stack's message transport: kombu's SQLAlchemy transport, made to lose nothing.

kombu's stock SQLAlchemy transport is a virtual broker with three gaps that each
strand an episode on the embedded stack:

* **Routing lives in the connection.** Exchange bindings are kept in memory per
  connection, so a publish to the ``megaflow`` exchange on a connection that never
  declared the target queue (a retry, a countdown, a re-sent waiter, a chord body
  published from a producer pool) matched no binding and was dropped without an
  error. Here routing follows the topology itself (`queues.topology`: every queue
  is bound to ``megaflow`` by its own name), which no connection has to learn.
* **A taken message is gone for good.** The stock transport hides a message when a
  consumer takes it and never deletes or restores it: an acknowledged message
  stays in the table, and one taken by a worker that then died is never seen
  again. Here an acknowledgement deletes the row, a requeue puts the message back,
  and `restore_unacked` makes every message taken by workers of an earlier stack
  visible again, flagged ``redelivered`` (so the delivery limit counts it), when
  a new stack starts on the same data directory.
* **No dead-lettering.** A message rejected without requeue was dropped; here it
  goes to ``megaflow.dead``, as on RabbitMQ.

All statements are Core statements on the transport's engine, one short
transaction each, so a threads-pool worker may acknowledge from any thread (the
stock transport shares one ORM session between them). The stock transport also
cannot take ``polling_interval`` through its options; an idle embedded worker
polls every `POLLING_INTERVAL` seconds instead of every second.
"""

from __future__ import annotations

import datetime
import json
import threading
from queue import Empty

from kombu.transport.sqlalchemy import Channel as _Channel
from kombu.transport.sqlalchemy import Transport as _Transport
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import MetaData, Table, create_engine, delete, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from queues import topology

#: Seconds an idle embedded worker waits before polling its queues again.
POLLING_INTERVAL = 0.05

#: Value for Celery's ``broker_transport`` that selects this transport.
TRANSPORT = "megaflow.kombu_sqlite:Transport"

#: Queue name -> row id, per database URL (queues are never deleted).
_queue_ids: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


class Channel(_Channel):
    """One channel of the embedded transport (see the module docstring)."""

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        # delivery tag -> message row id, for messages this channel handed out.
        self._rows: dict[str, int] = {}

    # -- tables ---------------------------------------------------------------
    @property
    def _engine(self):
        return self._open()[0]

    @property
    def _messages(self):
        return self.message_cls.__table__

    def _queue_id(self, queue: str) -> int:
        key = (str(self._engine.url), queue)
        qid = _queue_ids.get(key)
        if qid is not None:
            return qid
        table = self.queue_cls.__table__
        with _lock, self._engine.begin() as conn:
            qid = conn.execute(select(table.c.id).where(table.c.name == queue)).scalar()
            if qid is None:
                try:
                    with conn.begin_nested():
                        qid = conn.execute(insert(table).values(name=queue)).inserted_primary_key[0]
                except IntegrityError:  # another process created it first
                    qid = conn.execute(select(table.c.id).where(table.c.name == queue)).scalar_one()
        _queue_ids[key] = qid
        return qid

    # -- routing --------------------------------------------------------------
    def _lookup(self, exchange, routing_key, default=None):
        if exchange == topology.EXCHANGE.name:
            return [routing_key]
        if exchange == topology.DLX.name:
            return [topology.DEAD_QUEUE]
        return super()._lookup(exchange, routing_key, default)

    # -- messages -------------------------------------------------------------
    def _new_queue(self, queue, **kwargs):
        self._queue_id(queue)

    def _put(self, queue, payload, **kwargs):
        qid = self._queue_id(queue)
        with self._engine.begin() as conn:
            conn.execute(insert(self._messages).values(
                queue_id=qid, payload=json.dumps(payload), visible=True, version=1,
                timestamp=datetime.datetime.now()))

    def _get(self, queue):
        m = self._messages
        qid = self._queue_id(queue)
        head = (select(m.c.id).where(m.c.queue_id == qid, m.c.visible.is_(True))
                .order_by(m.c.id).limit(1).scalar_subquery())
        # One statement takes the head and hides it: atomic across processes
        # without holding a lock between a read and a write.
        with self._engine.begin() as conn:
            row = conn.execute(update(m).where(m.c.id == head, m.c.visible.is_(True))
                               .values(visible=False).returning(m.c.id, m.c.payload)).first()
        if row is None:
            raise Empty()
        message = json.loads(bytes_to_str(row.payload))
        self._rows[message["properties"]["delivery_tag"]] = row.id
        return message

    def _forget(self, delivery_tag) -> None:
        """Delete the row of a message that was acknowledged, requeued or dead-lettered."""
        row_id = self._rows.pop(delivery_tag, None)
        if row_id is not None:
            with self._engine.begin() as conn:
                conn.execute(delete(self._messages).where(self._messages.c.id == row_id))

    def basic_ack(self, delivery_tag, multiple=False):
        super().basic_ack(delivery_tag, multiple)
        self._forget(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        if not requeue:
            message = self.qos._delivered.get(delivery_tag)
            if message is not None:
                self._put(topology.DEAD_QUEUE, message.serializable())
        super().basic_reject(delivery_tag, requeue)
        if not requeue:
            self._forget(delivery_tag)

    def _restore(self, message):
        # kombu flags a restored message at the top level, where Celery never looks;
        # flagged in its delivery info, the delivery limit counts it as on RabbitMQ.
        info = message.delivery_info
        payload = message.serializable()
        payload["properties"] = _redelivered(payload["properties"])
        for queue in self._lookup(info["exchange"], info["routing_key"]):
            self._put(queue, payload)
        # The copy went in before the taken row goes: a crash between the two leaves
        # a duplicate (the hop ledger absorbs it), never a loss.
        self._forget(message.delivery_tag)

    def _size(self, queue):
        m = self._messages
        with self._engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(m).where(
                m.c.queue_id == self._queue_id(queue), m.c.visible.is_(True))).scalar_one()

    def _purge(self, queue):
        m = self._messages
        with self._engine.begin() as conn:
            return conn.execute(delete(m).where(m.c.queue_id == self._queue_id(queue))).rowcount


def _redelivered(properties: dict) -> dict:
    return {**properties, "delivery_info": {**properties.get("delivery_info", {}), "redelivered": True}}


class Transport(_Transport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL


def restore_unacked(broker_url: str) -> int:
    """Make every message taken but never acknowledged visible again; returns how many.

    Only for a broker no worker is using (a new embedded stack, before its workers
    start): their consumers died with the earlier stack, so the messages they held
    would otherwise never be delivered. Each is flagged ``redelivered``, as RabbitMQ
    flags a message whose consumer died.
    """
    engine = create_engine(broker_url)
    try:
        if not inspect(engine).has_table("kombu_message"):
            return 0
        table = Table("kombu_message", MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            rows = conn.execute(select(table.c.id, table.c.payload).where(table.c.visible.is_(False))).all()
            for row in rows:
                payload = json.loads(row.payload)
                payload["properties"] = _redelivered(payload["properties"])
                conn.execute(update(table).where(table.c.id == row.id)
                             .values(visible=True, payload=json.dumps(payload)))
        return len(rows)
    finally:
        engine.dispose()
