"""Celery plumbing of an episode: which task and queue a `Next` hop goes to, and how the
episode task hands its chord membership on to it (`continue_with`).
"""

from __future__ import annotations

from megaflow.contract import Next
from megaflow.hops.delay import delayed_options
from queues import topology

HOP_TASKS = {
    "provision": "megaflow.hop.provision",
    "generate": "megaflow.hop.generate",
    "exec": "megaflow.hop.exec",
    "evaluate": "megaflow.hop.evaluate",
    "release": "megaflow.hop.release",
}
#: Hops that must run on the env host that holds the episode's sandbox.
HOST_BOUND = frozenset({"exec", "evaluate", "release"})


def label(run_id: str | None, episode_id: str, step: int | None = None, hop: str | None = None) -> str:
    """What Flower shows as a task's arguments: ``run=… episode=… step=3 hop=exec``.

    Set as the message's ``argsrepr``, so Flower's search finds a run's work by its id
    (the real arguments are ids and the previous hop's result, unreadable there).
    """
    parts = [f"run={run_id or '?'}", f"episode={episode_id}"]
    if step is not None:
        parts.append(f"step={step}")
    if hop:
        parts.append(f"hop={hop}")
    return " ".join(parts)


def next_signature(app, episode_id: str, nxt: Next, run_id: str | None = None):
    """``hop | episode``: the next hop, routed to its queue, then the episode's next decision.

    `run_id` (from the runtime's cached refs) only labels the messages for Flower.
    """
    options = {}
    if nxt.hop in HOST_BOUND or (nxt.hop == "provision" and nxt.host):
        queue = topology.env_host_queue(nxt.host).name
        options = {"queue": queue, "exchange": topology.EXCHANGE.name, "routing_key": queue}
    if nxt.delay:
        # A simulated service latency (RunSpec.simulate): the message waits on the broker.
        target = options.get("queue") or topology.TASK_QUEUES[HOP_TASKS[nxt.hop]]
        options = delayed_options(app, target, nxt.delay)
    return app.signature(HOP_TASKS[nxt.hop], args=(episode_id, nxt.step), **options,
                         argsrepr=label(run_id, episode_id, nxt.step, nxt.hop)) | app.signature(
        "megaflow.episode", args=(episode_id,), argsrepr=f"{label(run_id, episode_id, nxt.step)} after={nxt.hop}")


def continue_with(task, sig) -> None:
    """`Task.replace` without its exception.

    Like replace, the continuation takes over this task's id and its chord
    membership. Replace then raises `Ignore`, and Celery formats a full traceback
    for every Ignore: a fifth of an agent worker's time. Here the task returns
    normally instead, having handed its chord membership to the continuation —
    so this delivery's success is not counted as the episode's end.

    `sig` is ``hop | episode`` (`next_signature`). The message is the one
    ``sig.apply_async()`` would send — the hop, with the episode task as its chain
    carrying this task's id and chord options — built without Celery's canvas
    (freezing and cloning every step cost more than the publish itself).
    """
    req = task.request
    hop, then = sig.tasks
    then = dict(then, options=dict(then.options, task_id=req.id, reply_to=task.app.thread_oid,
                                   root_id=req.root_id, group_id=req.group, chord=req.chord,
                                   group_index=req.group_index))
    task.app.tasks[hop.task].apply_async(hop.args, hop.kwargs, root_id=req.root_id, chain=[then], **hop.options)
    req.chord = None
