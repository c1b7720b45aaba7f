"""The embedded transport (SQLite through kombu) loses no message: routing, acks, requeues, dead letters,
and messages held by workers of a stack that died."""

from __future__ import annotations

import pytest
from kombu import Connection, Producer

from megaflow.kombu_sqlite import TRANSPORT, restore_unacked
from queues import topology


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'broker.sqlite'}"


def connect(url: str) -> Connection:
    return Connection(url, transport=TRANSPORT)


def publish(url: str, body, queue: str = "agent") -> None:
    """Publish on a fresh connection that never declared anything (as a retry or a chord body does)."""
    with connect(url) as conn:
        Producer(conn.default_channel, exchange=topology.EXCHANGE).publish(body, routing_key=queue, declare=[])


def get(url: str, queue: str = "agent"):
    """Take one message and acknowledge it (a consumer's connection puts back what it did not ack)."""
    with connect(url) as conn:
        message = topology.make_queue(queue)(conn.default_channel).get()
        if message is not None:
            message.ack()
        return message


def test_a_publish_on_a_connection_that_declared_nothing_arrives(url):
    # The stock transport kept bindings per connection and dropped this message without an error.
    with connect(url) as conn:
        topology.make_queue("agent")(conn.default_channel).declare()
    publish(url, {"n": 1})
    publish(url, {"n": 2}, queue="env.some-host")  # a queue nobody declared yet
    assert get(url).payload == {"n": 1}
    assert get(url, "env.some-host").payload == {"n": 2}
    assert get(url) is None


def test_acked_messages_are_gone_and_unacked_ones_come_back_redelivered(url):
    publish(url, {"n": 1})
    publish(url, {"n": 2})
    with connect(url) as conn:
        queue = topology.make_queue("agent")(conn.default_channel)
        first = queue.get()
        first.ack()
        second = queue.get()
        assert (first.payload, second.payload) == ({"n": 1}, {"n": 2})
        assert not second.delivery_info.get("redelivered")
        # The worker holding `second` dies here: no ack, no graceful close.
        conn.default_channel.qos._delivered.clear()
    assert get(url) is None  # taken and hidden, as long as its consumer may be alive
    assert restore_unacked(url) == 1  # a new stack starts on the same data directory
    again = get(url)
    assert again.payload == {"n": 2} and again.delivery_info["redelivered"] is True
    assert restore_unacked(url) == 0 and get(url) is None  # acked: gone for good
    assert restore_unacked(f"sqlite:///{url.rsplit('/', 1)[0][10:]}/empty.sqlite") == 0


def test_requeued_messages_are_flagged_redelivered_and_rejected_ones_are_dead_lettered(url):
    publish(url, {"n": 1})
    publish(url, {"n": 2})
    with connect(url) as conn:
        queue = topology.make_queue("agent")(conn.default_channel)
        queue.get().reject(requeue=False)
        queue.get().requeue()
        back = queue.get()
        assert back.payload == {"n": 2} and back.delivery_info["redelivered"] is True
        back.ack()
        assert queue.get() is None
    dead = get(url, topology.DEAD_QUEUE)
    assert dead.payload == {"n": 1}
    assert restore_unacked(url) == 0 and get(url) is None


def test_a_closing_connection_puts_back_what_it_held(url):
    publish(url, {"n": 1})
    with connect(url) as conn:
        channel = conn.default_channel
        assert topology.make_queue("agent")(channel).get().payload == {"n": 1}
        channel.qos.restore_unacked_once()  # what a worker's warm shutdown does
    back = get(url)
    assert back.payload == {"n": 1} and back.delivery_info["redelivered"] is True
    assert restore_unacked(url) == 0 and get(url) is None  # the original row went with the put-back
