"""Settings from the environment (prefix ``MEGAFLOW_``), with embedded defaults.

With nothing set, everything lives under ``MEGAFLOW_DATA_DIR`` (default
``~/.megaflow``): SQLite state, a SQLite-backed Celery transport and the local
sandbox, so a fresh machine needs no server at all.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every ``MEGAFLOW_*`` setting: broker, database, workers, sandboxes, logging.

    Read once at an entry point (``Settings()``: the CLI, a worker, a test) and
    passed down; library code does not read ``MEGAFLOW_*`` from the environment.
    `env` hands a settings object to a child process.
    """

    model_config = SettingsConfigDict(env_prefix="MEGAFLOW_", extra="ignore")

    data_dir: Path = Field(default=Path.home() / ".megaflow", description="Embedded state and sandboxes.")
    model_cache: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megaflow" / "models",
        description="GGUF weights converted once to Hugging Face directories, shared by every process "
        "(megaflow.model.gguf_cache); outside data_dir, so per-run data dirs share it.")
    broker_url: str | None = Field(default=None, description="Celery broker, e.g. amqp://guest:guest@host:5672//.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the state database, e.g. postgresql+psycopg2://u@h/db."
    )
    result_backend: str | None = Field(
        default=None,
        description="Celery result backend. Default: MegaFlow's SQL chord backend on the state database.",
    )
    host: str = Field(default_factory=socket.gethostname, description="This env host's name (queue env.<host>).")
    sandbox_capacity: int = Field(default=64, ge=1, description="Sandboxes this env host may hold at once.")
    placement: bool = Field(
        default=True, description="Place each episode on a registered env host (least loaded, image affinity);"
        " off: any env worker provisions from the shared `env` queue.")
    heartbeat_s: float = Field(default=5.0, gt=0, description="How often an env host renews its heartbeat.")
    host_dead_after_s: float = Field(
        default=30.0, gt=0, description="An env host whose heartbeat is older than this gets no new episodes.")
    hop_max_deliveries: int = Field(
        default=5, ge=1, description="A message executed more often (its earlier deliveries killed their worker "
        "or timed out) is poison: its episode ends infra_failed, or it is dead-lettered (megaflow.delivery).")
    consumer_timeout_s: float = Field(
        default=1800.0, gt=0, description="The broker's consumer_timeout (RabbitMQ's default: 30 min). Every task's "
        "hard time limit stays below it, and specs whose deadlines would not are refused (megaflow.deadlines).")
    watchdog_exit: bool = Field(
        default=True, description="A threads-pool worker whose task outlives its hard time limit exits, so the "
        "broker redelivers now rather than at its consumer timeout (megaflow.watchdog).")
    sandbox_backends: str = Field(
        default="", description="Comma-separated sandbox backends this env host must run (local, docker): its "
        "worker checks them at start and exits non-zero, with the reason, if one cannot work. Empty: no check.")
    model_backends: str = Field(
        default="", description="Comma-separated model backends this model worker must load (transformers, vllm): "
        "their packages are checked at its start, which fails (exit 3) with the reason. Empty: no check.")
    reap_interval_s: float = Field(
        default=60.0, gt=0, description="How often an env worker reaps leaked sandboxes of its host (seconds)."
    )
    log_level: str = Field(
        default="WARNING", description="Log level of the `megaflow` command (`-v`: INFO) and of the workers a "
        "local stack starts: DEBUG, INFO, WARNING or ERROR.")
    worker_pool: str | None = Field(
        default=None, description="Celery pool type of a worker (threads, prefork, solo). Default: its pool's "
        "own (workers.common.POOL_DEFAULTS).")
    worker_concurrency: int | None = Field(
        default=None, description="Tasks a worker runs at once. Default: its pool's own (one for the agent pool "
        "on SQLite, which takes one writer at a time).")
    worker_queues: str = Field(
        default="", description="Comma-separated queues a worker consumes instead of its pool's own (benchmarks "
        "use a private queue). Empty: the pool's own.")
    agent_processes: int = Field(
        default=0, ge=0, description="Agent worker processes of a one-machine stack on a server database; "
        "0: one per core. Always one when embedded (SQLite).")
    sandbox_uid: int = Field(
        default=65534, description="Host uid that local (bubblewrap) sandboxes run as when MegaFlow runs as "
        "root; 65534 is nobody, a dedicated uid is better (files in work dirs belong to it). Must not be 0.")
    debian_mirror: str | None = Field(
        default=None, description="Debian mirror url that sandbox base images are bootstrapped from. Default: "
        "the one this host's apt sources name.")
    wheelhouse: Path | None = Field(
        default=None, description="Directory of wheels that environments' pip requirements install from "
        "(offline hosts; `--find-links` wins). Default: none, the package registries.")
    flower_basic_auth: SecretStr | None = Field(
        default=None, description="user:password (several separated by commas) that `megaflow flower` asks "
        "for; required to bind anything but loopback.")
    flower_broker_api: SecretStr | None = Field(
        default=None, description="RabbitMQ management API that Flower's Broker tab reads, e.g. "
        "http://user:pass@host:15672/api/. Default: derived from the broker URL (its credentials and host, "
        "port 15672; https and 15671 for amqps).")

    def env(self) -> dict[str, str]:
        """Environment variables that make a child process (a worker, a CLI) see these settings.

        Unset (None) fields are left out, so the child keeps whatever it inherits.
        """
        prefix = self.model_config["env_prefix"]
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                out[f"{prefix}{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def worker_queue_names(self) -> list[str]:
        """`worker_queues` as a list."""
        return [t.strip() for t in self.worker_queues.split(",") if t.strip()]

    def required_sandboxes(self) -> list[str]:
        """`sandbox_backends` as a list."""
        return [t.strip() for t in self.sandbox_backends.split(",") if t.strip()]

    def required_models(self) -> list[str]:
        """`model_backends` as a list."""
        return [t.strip() for t in self.model_backends.split(",") if t.strip()]

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: the server-free local stack."""
        return self.broker_url is None

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'megaflow.sqlite'}"

    def resolved_broker_url(self) -> str:
        # Embedded: a SQLite file through megaflow.kombu_sqlite (see make_app).
        return self.broker_url or f"sqlite:///{self.data_dir / 'broker.sqlite'}"

    def resolved_result_backend(self) -> str:
        return self.result_backend or "megaflow.chord_backend:SQLChordBackend+" + self.resolved_database_url()
