"""Bad input for tests and `megaflow bench chaos`: specs that must be refused, messages that must be dead-lettered.

`BAD_SPECS` are refused by `RunSpec` (or by `Client.submit`) before anything is
written or queued. `malformed_messages` are raw messages for every queue — not
JSON, pickled (one would run a command if ever unpickled), not Celery messages,
unknown tasks, known tasks with arguments they cannot take — each of which a
worker must reject into ``megaflow.dead`` and carry on.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid

from kombu import Connection, Producer

from megaflow.errors import SpecError

TASK = {"instance_id": "t", "instruction": "do it", "check": "true"}

#: Specs that must be refused before anything is queued, each with what the refusal must name.
BAD_SPECS = [
    # missing fields
    ({}, "tasks"),
    ({"tasks": [{"instruction": "x", "check": "true"}]}, "instance_id"),
    ({"tasks": [{"instance_id": "t", "check": "true"}]}, "instruction"),
    ({"tasks": [{"kind": "swe", "instance_id": "t"}]}, "problem_statement"),
    ({"tasks": [TASK], "model": {"type": "openai", "model": "m"}}, "endpoints"),
    # mistyped fields: refused, never coerced
    ({"tasks": [TASK], "rollouts": "3"}, "rollouts"),
    ({"tasks": [TASK], "rollouts": 2.5}, "rollouts"),
    ({"tasks": [TASK], "sandbox": {"network": "yes"}}, "sandbox.network"),
    ({"tasks": [TASK], "limits": {"max_steps": "10"}}, "limits.max_steps"),
    ({"tasks": "t1,t2"}, "tasks"),
    ({"tasks": [TASK], "model": {"type": "scripted", "replies": "echo hi"}}, "replies"),
    ({"tasks": [dict(TASK, setup="make")]}, "setup"),
    ({"tasks": [TASK], "sandbox": {"env": {"A": 1}}}, "sandbox.env"),
    # unknown backends, kinds, fields
    ({"tasks": [TASK], "model": {"type": "gpt-telepathy"}}, "model"),
    ({"tasks": [TASK], "sandbox": {"type": "vm"}}, "sandbox.type"),
    ({"tasks": [TASK], "agent": {"type": "genius"}}, "agent.type"),
    ({"tasks": [dict(TASK, kind="desktop")]}, "tasks"),
    ({"tasks": [TASK], "colour": "blue"}, "colour"),
    ({"tasks": [TASK], "sandbox": {"mode": "forever"}}, "sandbox.mode"),
    # absurd sizes
    ({"tasks": [TASK], "rollouts": 1_000_000}, "rollouts"),
    ({"tasks": [TASK], "sandbox": {"memory_mb": 10**9}}, "sandbox.memory_mb"),
    ({"tasks": [TASK], "sandbox": {"memory_mb": -1}}, "sandbox.memory_mb"),
    ({"tasks": [TASK], "sandbox": {"cpus": 0}}, "sandbox.cpus"),
    ({"tasks": [TASK], "sandbox": {"pids": 10**7}}, "sandbox.pids"),
    ({"tasks": [TASK], "sandbox": {"max_output_bytes": 1 << 34}}, "sandbox.max_output_bytes"),
    ({"tasks": [TASK], "limits": {"max_steps": 10**9}}, "limits.max_steps"),
    ({"tasks": [TASK], "limits": {"max_tokens": 10**15}}, "limits.max_tokens"),
    ({"tasks": [TASK], "limits": {"episode_timeout_s": 10**9}}, "limits.episode_timeout_s"),
    ({"tasks": [TASK], "limits": {"exec_timeout_s": 0}}, "limits.exec_timeout_s"),
    ({"tasks": [TASK], "model": {"type": "scripted", "sampling": {"max_tokens": 10**9}}}, "max_tokens"),
    ({"tasks": [dict(TASK, instance_id=f"t{i}") for i in range(300)], "rollouts": 4000}, "over the limit"),
    ({"tasks": [TASK], "name": "x" * 300}, "name"),
    ({"tasks": [TASK], "model": {"type": "scripted", "replies": []}}, "replies"),
    ({"tasks": [TASK], "model_limits": {"scope": "run"}}, "at least one"),
    # paths and names that would escape where they belong
    ({"tasks": [dict(TASK, instance_id="../../etc/x")]}, "instance_id"),
    ({"tasks": [dict(TASK, instance_id="-rf")]}, "instance_id"),
    ({"tasks": [dict(TASK, files={"../outside.txt": "x"})]}, "files"),
    ({"tasks": [dict(TASK, files={"/etc/passwd": "x"})]}, "files"),
    ({"tasks": [TASK], "sandbox": {"workdir": "/"}}, "workdir"),
    ({"tasks": [TASK], "sandbox": {"workdir": "/etc"}}, "workdir"),
    ({"tasks": [TASK], "sandbox": {"workdir": "work"}}, "workdir"),
    ({"tasks": [TASK], "sandbox": {"env": {"A=B": "x"}}}, "sandbox.env"),
    ({"tasks": [{"kind": "swe", "instance_id": "s", "problem_statement": "p",
                 "repo": "--upload-pack=touch /tmp/pwned;.git"}]}, "repo"),
    ({"tasks": [{"kind": "swe", "instance_id": "s", "problem_statement": "p",
                 "repo": "https://example.org/r.git#--orphan"}]}, "repo"),
    ({"tasks": [{"kind": "swe", "instance_id": "s", "problem_statement": "p", "repo": "pypi:six"}]}, "repo"),
    ({"tasks": [dict(TASK, instruction="a\x00b")]}, "NUL"),
    ({"tasks": [TASK, TASK]}, "duplicate instance_id"),
    # credentials: never in a spec
    ({"tasks": [TASK], "model": {"type": "openai", "model": "m", "endpoints": ["http://h/v1"],
                                 "api_key": "sk-live-0123456789abcdefghij"}}, "model.api_key"),
    ({"tasks": [TASK], "model": {"type": "openai", "model": "m",
                                 "endpoints": ["http://user:hunter2hunter2@h/v1"]}}, "endpoints"),
    ({"tasks": [TASK], "sandbox": {"env": {"OPENAI_API_KEY": "sk-0123456789abcdefghijkl"}}}, "OPENAI_API_KEY"),
    ({"tasks": [TASK], "sandbox": {"env": {"HF_TOKEN": "whatever"}}}, "HF_TOKEN"),
    ({"tasks": [TASK], "agent": {"system_prompt": "use ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"}},
     "agent.system_prompt"),
    ({"tasks": [TASK], "model": {"type": "openai", "model": "m", "endpoints": ["localhost:8000"]}}, "endpoint"),
]


class _Exploit:
    """Unpickling this runs a shell command: exactly what a worker must never do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def malformed_messages(app, host: str, marker) -> list[tuple[str, dict]]:
    """(queue, message) for every kind of bad message on every queue."""
    def headers(name, args=()):
        return dict(app.amqp.as_task_v2(uuid.uuid4().hex, name, args=args).headers)

    return [
        # not JSON at all, though it says it is
        ("agent", {"body": b"{not json", "content_type": "application/json", "content_encoding": "utf-8",
                   "headers": headers("megaflow.episode")}),
        ("model", {"body": b"\xff\xfe\x00garbage", "content_type": "application/json", "content_encoding": "utf-8",
                   "headers": headers("megaflow.hop.generate")}),
        # a pickle: refused, never unpickled
        ("env", {"body": pickle.dumps(((_Exploit(marker),), {}, {})), "content_type": "application/x-python-serialize",
                 "content_encoding": "binary", "headers": headers("megaflow.hop.provision")}),
        (f"env.{host}", {"body": pickle.dumps(_Exploit(marker)), "content_type": "application/x-python-serialize",
                         "content_encoding": "binary", "headers": headers("megaflow.hop.exec")}),
        # JSON, but not a Celery message
        ("agent", {"body": json.dumps({"hello": "world"}).encode(), "content_type": "application/json",
                   "content_encoding": "utf-8", "headers": {}}),
        ("model", {"body": b"[1, 2, 3]", "content_type": "application/json", "content_encoding": "utf-8",
                   "headers": {}}),
        # an unknown task
        ("env", {"body": json.dumps([[1], {}, {}]).encode(), "content_type": "application/json",
                 "content_encoding": "utf-8", "headers": headers("megaflow.no_such_task")}),
        # known tasks with arguments that make no sense
        ("agent", {"body": json.dumps([["not", "a", "decision", "at", "all"], {}, {}]).encode(),
                   "content_type": "application/json", "content_encoding": "utf-8",
                   "headers": headers("megaflow.episode")}),
        (f"env.{host}", {"body": json.dumps([["no-such-episode", 0], {}, {}]).encode(),
                         "content_type": "application/json", "content_encoding": "utf-8",
                         "headers": headers("megaflow.hop.exec")}),
        ("model", {"body": json.dumps([[{"x": 1}], {"bogus": True}, {}]).encode(),
                   "content_type": "application/json", "content_encoding": "utf-8",
                   "headers": headers("megaflow.hop.generate")}),
    ]


def refuse_all(client) -> int:
    """Submit every bad spec; returns how many were refused (all, or a bug)."""
    refused = 0
    for spec, _ in BAD_SPECS:
        try:
            client.submit(spec)
        except SpecError:
            refused += 1
    return refused


def publish(broker_url: str, messages: list[tuple[str, dict]]) -> None:
    """Publish raw messages (persistent) to their queues on the megaflow exchange."""
    with Connection(broker_url) as conn:
        producer = Producer(conn.channel())
        for queue, msg in messages:
            producer.publish(msg["body"], exchange="megaflow", routing_key=queue, headers=msg["headers"],
                             content_type=msg["content_type"], content_encoding=msg["content_encoding"],
                             delivery_mode=2)


def dead_letters(app) -> list[str]:
    """Drain ``megaflow.dead``; returns the queue each message was dead-lettered from."""
    origins = []
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        while (msg := ch.basic_get("megaflow.dead", no_ack=True)) is not None:
            death = (msg.headers or {}).get("x-death") or [{}]
            origins.append(death[0].get("queue", "?"))
    return origins
