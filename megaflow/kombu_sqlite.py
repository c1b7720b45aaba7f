"""kombu's SQLAlchemy transport, with a short polling interval.

The stock transport hands every transport option to ``create_engine``, so
``polling_interval`` cannot be set through options; without it an idle worker
sleeps a full second between polls, which adds up to a second to every hop of
the embedded stack.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Channel as _Channel
from kombu.transport.sqlalchemy import Transport as _Transport

#: Seconds an idle embedded worker waits before polling its queues again.
POLLING_INTERVAL = 0.05


class Channel(_Channel):
    pass


class Transport(_Transport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL


#: Value for Celery's ``broker_transport`` that selects this transport.
TRANSPORT = "megaflow.kombu_sqlite:Transport"
