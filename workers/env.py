"""The env pool's worker: `celery -A workers.env worker` or `megaflow worker env`."""

from workers.common import make_worker_app

app = make_worker_app("env")
