"""MegaFlow: many LLM-agent episodes, event-driven on Celery, RabbitMQ and PostgreSQL."""

from __future__ import annotations

from megaflow.client import Client
from megaflow.config import Settings
from megaflow.spec import RunSpec

__all__ = ["Client", "RunSpec", "Settings"]
__version__ = "0.1.0"
