"""A private RabbitMQ node and PostgreSQL server for `megaflow bench chaos --private-services`.

Restarting the machine's own RabbitMQ and PostgreSQL mid-run disturbs everything
else that uses them. With private services the chaos bench starts a RabbitMQ node
and a PostgreSQL server of its own (same installed versions, own ports and data
directories, Debian's packages), restarts *those*, and removes them afterwards.
Needs root (the servers run as the ``rabbitmq`` and ``postgres`` users).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from megaflow.bench.faults import amqp_ready, sql_ready


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start within {timeout_s:.0f}s")


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: ``mfchaos<id>@localhost`` on a free port."""

    def __init__(self, root: Path):
        self.root = root / "rabbitmq"
        self.node = f"mfchaos{uuid.uuid4().hex[:6]}@localhost"
        self.port, self.dist_port = _free_port(), _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        r = self.root
        return {"RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
                "RABBITMQ_LOG_BASE": str(r / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq"), "RABBITMQ_PID_FILE": str(r / "pid")}

    def _prefix(self) -> str:
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())

    @property
    def start_command(self) -> str:
        return f"{self._prefix()} rabbitmq-server -detached"

    @property
    def restart_command(self) -> str:
        return f"{self._prefix()} rabbitmqctl -n {self.node} shutdown && {self.start_command}"

    def start(self) -> PrivateRabbitMQ:
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.root)], check=True)
        subprocess.run(["bash", "-c", self.start_command], check=True, capture_output=True)
        _wait(amqp_ready_any(self.url), 120, f"RabbitMQ node {self.node}")
        return self

    def stop(self) -> None:
        subprocess.run(["bash", "-c", f"{self._prefix()} rabbitmqctl -n {self.node} shutdown"], capture_output=True)


def amqp_ready_any(url: str):
    """Ready once the node accepts an AMQP connection (no queue needed yet)."""
    def ready() -> bool:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    return ready


class PrivatePostgres:
    """A PostgreSQL server of its own, on a free port, trusting local connections."""

    def __init__(self, root: Path):
        self.root = root / "postgres"
        self.port = _free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.bin = _pg_bin()

    def _as_postgres(self, command: str) -> str:
        return f"su postgres -s /bin/sh -c {shlex.quote(command)}"

    @property
    def _ctl(self) -> str:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        return f"{self.bin}/pg_ctl -D {self.root / 'data'} -l {self.root / 'log'} -o {shlex.quote(opts)}"

    @property
    def restart_command(self) -> str:
        return self._as_postgres(f"{self._ctl} -m fast -w restart")

    def start(self) -> PrivatePostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
        subprocess.run(["bash", "-c", self._as_postgres(
            f"{self.bin}/initdb -D {self.root / 'data'} -A trust -U postgres >/dev/null")], check=True)
        subprocess.run(["bash", "-c", self._as_postgres(f"{self._ctl} -w start >/dev/null")], check=True)
        _wait(sql_ready(self.url), 60, "PostgreSQL")
        return self

    def stop(self) -> None:
        subprocess.run(["bash", "-c", self._as_postgres(f"{self._ctl} -m immediate stop")], capture_output=True)


def _pg_bin() -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return str(versions[-1].parent)


def missing() -> str | None:
    """Why private services cannot run here, or None."""
    if os.geteuid() != 0:
        return "private services need root (the servers run as the rabbitmq and postgres users)"
    for program in ("rabbitmq-server", "rabbitmqctl", "su"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    try:
        _pg_bin()
    except RuntimeError as exc:
        return str(exc)
    return None


class PrivateServices:
    """Both, as a context manager: ``with PrivateServices() as svc: svc.broker_url …``."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="megaflow-services-"))
        os.chmod(self.root, 0o755)
        self.rabbitmq = PrivateRabbitMQ(self.root)
        self.postgres = PrivatePostgres(self.root)

    def __enter__(self) -> PrivateServices:
        why = missing()
        if why:
            raise RuntimeError(why)
        try:
            self.rabbitmq.start()
            self.postgres.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.rabbitmq.stop()
        self.postgres.stop()
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["PrivateServices", "amqp_ready", "missing"]
