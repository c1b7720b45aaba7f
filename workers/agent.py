"""The agent pool's worker: `celery -A workers.agent worker` or `megaflow worker agent`."""

from workers.common import make_worker_app

app = make_worker_app("agent")
