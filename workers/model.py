"""The model pool's worker: `celery -A workers.model worker` or `megaflow worker model`."""

from workers.common import make_worker_app

app = make_worker_app("model")
