"""`megaflow bench swe`: SWE instances graded per hour on Docker, beside a plain harness on the same instances.

MegaFlow runs the task set with the oracle agent on the docker backend through a
whole stack (workers, broker, database), at most `concurrency` sandboxes at once,
timed from submission to the run's end, after a one-instance warm-up run (the
workers' start is not throughput). The floor, measured in the same run on the
same instances and images at the same concurrency and with the sandbox's memory and
CPU limits, is a plain script: per instance one ``docker run``, ``git apply`` of the
gold patch (and the test patch), the test command, ``docker rm``. ``ratio_to_plain_harness`` is MegaFlow's rate over the
floor's (target ≥ 0.9). Phase p50s come from the recorded hops: provision, agent
(from the provision's end to the evaluation's start), tests (the evaluate hop),
teardown (the release hop).
"""

from __future__ import annotations

import base64
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megaflow.config import Settings


def _b64_write(path: str, text: str) -> str:
    return f"echo {base64.b64encode(text.encode()).decode()} | base64 -d > {path}"


def plain_instance(client, task, config, ncpu: int) -> bool:
    """One instance the plain way; True iff its test command exits 0."""
    from megaflow.envs.swe import RUNNER_FILE, tests_command

    # The sandbox's memory and CPU limits: the CPU quota alone slows tests ~5 % at
    # 4 containers on 2 cores (CFS throttling), a cost of the limit, not of the harness.
    cpus = min(config.cpus, ncpu)  # as the docker backend caps it
    container = client.containers.run(config.image, ["sleep", "infinity"], detach=True, network_mode="none",
                                      mem_limit=f"{config.memory_mb}m", nano_cpus=int(cpus * 1e9), user="1000",
                                      working_dir=config.workdir)
    try:
        steps = []
        if RUNNER_FILE in task.test_command:  # the task's tests run with the pytest-free runner
            runner = (Path(__file__).resolve().parents[1] / "envs" / "runtests.py").read_text()
            steps.append(_b64_write(RUNNER_FILE, runner))
        for rel, content in task.files.items():  # small repos given inline
            steps += [f"mkdir -p \"$(dirname {rel})\"", _b64_write(rel, content)]
        steps += task.setup
        for name, patch in (("gold.patch", task.patch), ("test.patch", task.test_patch)):
            if patch:
                steps += [_b64_write(f"/tmp/{name}", patch), f"git apply /tmp/{name}"]
        steps.append(tests_command(task, [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]))
        # No bytecode written, as MegaFlow's evaluation runs the tests: like for like.
        code, _ = container.exec_run(["bash", "-lc", " && ".join(steps)], user="1000", workdir=config.workdir,
                                     environment={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"})
        return code == 0
    finally:
        container.remove(force=True)


def admission_order(tasks, rollouts: int) -> list:
    """The instances in the order MegaFlow admits a run's episodes: each task's rollouts together.

    The plain harness takes them in the same order: with instances of unlike
    lengths on a few slots, the order alone moves the makespan (the tail) by more
    than the overhead measured here.
    """
    return [t for t in tasks for _ in range(rollouts)]


def plain_harness(client, tasks, base, concurrency: int) -> tuple[float, int]:
    """(seconds, instances passing) for the plain script over `tasks` at `concurrency`."""
    from megaflow.envs.swe import sandbox_config

    ncpu = int(client.info()["NCPU"])
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = list(pool.map(lambda t: plain_instance(client, t, sandbox_config(base, t), ncpu), tasks))
    return time.monotonic() - started, sum(ok)


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def phase_p50s(session, run_id: str) -> dict:
    """p50 seconds of each phase over the run's episodes, from the hop rows."""
    from sqlalchemy import select

    from megaflow.db.models import Episode, Hop, SandboxRow

    rows = session.execute(select(Hop.subject_id, Hop.hop, Hop.started_at, Hop.finished_at, Hop.duration_s)
                           .join(Episode, Episode.id == Hop.subject_id).where(Episode.run_id == run_id)).all()
    destroyed = dict(session.execute(select(SandboxRow.episode_id, SandboxRow.destroyed_at)
                                     .where(SandboxRow.run_id == run_id)).all())
    by_ep: dict[str, dict] = {}
    for ep, hop, start, end, dur in rows:
        by_ep.setdefault(ep, {})[hop] = (start, end, dur)
    phases: dict[str, list[float]] = {"provision": [], "agent": [], "tests": [], "teardown": []}
    for ep, hops in by_ep.items():
        prov, ev = hops.get("provision"), hops.get("evaluate")
        if prov and prov[2] is not None:
            phases["provision"].append(prov[2])
        if ev and ev[2] is not None:
            phases["tests"].append(ev[2])
        if prov and ev and prov[1] and ev[0]:
            phases["agent"].append((ev[0] - prov[1]).total_seconds())
        # The sandbox goes once the reward is recorded: from the evaluate hop's end to its destruction.
        if ev and ev[1] and destroyed.get(ep):
            phases["teardown"].append(max(0.0, (destroyed[ep] - ev[1]).total_seconds()))
    return {f"p50_{k}_s": _p50(v) for k, v in phases.items()}


def megaflow_rounds(tasks, base, concurrency: int, settings: Settings, rounds: int, plain, rollouts: int = 1) -> dict:
    """Time `rounds` runs of the oracle over `tasks` through a whole stack, each right after a plain round.

    Interleaved (plain, MegaFlow, plain, MegaFlow …) so that both sides see the same
    load: on a shared host, timing one side after the other measured the load's
    drift as much as either side (ratios from 0.43 to 0.85 for the same code).
    `plain()` runs one plain round and returns (seconds, instances passing).
    """
    from megaflow.client import Client
    from megaflow.db.engine import session_scope
    from megaflow.local_stack import LocalStack

    settings = settings.model_copy(update={"sandbox_capacity": concurrency})
    spec = {"name": "bench-swe", "rollouts": rollouts, "agent": {"type": "oracle"}, "sandbox": base.model_dump(mode="json"),
            "tasks": [t.model_dump(mode="json") for t in tasks]}
    out = {"megaflow_s": 0.0, "plain_s": 0.0, "plain_ok": 0, "resolved": 0, "submit_s": 0.0, "phases": {}}
    with LocalStack(settings).start():
        client = Client(settings)
        # The plain harness starts with a warm Docker engine; MegaFlow's workers are
        # still booting (imports, broker, database: ~2 s on the bench host) when the
        # stack returns. A one-instance run first, so that the clock measures
        # throughput, not start-up.
        warmup = {**spec, "name": "bench-swe-warmup", "rollouts": 1, "tasks": spec["tasks"][:1]}
        client.wait(client.submit(warmup), timeout=600)
        for i in range(rounds):
            seconds, ok = plain()
            out["plain_s"] += seconds
            out["plain_ok"] += ok
            started = time.monotonic()
            run_id = client.submit({**spec, "name": f"bench-swe-{i}"})
            out["submit_s"] += time.monotonic() - started
            status = client.wait(run_id, timeout=3600)  # woken by the run's end (PostgreSQL NOTIFY)
            out["megaflow_s"] += time.monotonic() - started
            out["resolved"] += round((status.get("mean_reward") or 0.0) * len(tasks) * rollouts)
            with session_scope(settings.resolved_database_url()) as s:
                for name, value in phase_p50s(s, run_id).items():
                    out["phases"].setdefault(name, []).append(value)
    out["phases"] = {k: _p50([v for v in vs if v is not None]) for k, vs in out["phases"].items()}
    return out


def run_swe_bench(tasks_path: str | Path, concurrency: int = 4, repeat: int = 1, memory_mb: int = 1024,
                  settings: Settings | None = None, find_links=None, rollouts: int = 1, cpus: float = 1.0) -> dict:
    """The figures of the module docstring, as one dict.

    `repeat` interleaved rounds of each side, each grading every instance `rollouts` times.
    """
    import docker

    from megaflow.envs.repos import build_repo_image
    from megaflow.sandbox.base import SandboxConfig
    from megaflow.validate import load_task_set

    settings = settings or Settings()
    if settings.embedded:
        settings = settings.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="megaflow-bench-swe-"))})
    tasks = [t for t in load_task_set(tasks_path) if t.kind == "swe"]
    client = docker.from_env()
    for t in tasks:  # cached: only the first bench on a host builds them
        if t.repo and not t.image:
            build_repo_image(client, t.repo, settings.data_dir, env=t.environment, find_links=find_links)
    base = SandboxConfig(type="docker", memory_mb=memory_mb, cpus=cpus)
    got = megaflow_rounds(tasks, base, concurrency, settings, repeat, rollouts=rollouts,
                          plain=lambda: plain_harness(client, admission_order(tasks, rollouts), base, concurrency))
    n = len(tasks) * rollouts * repeat
    swe_rate, plain_rate = n / got["megaflow_s"] * 3600, n / got["plain_s"] * 3600
    return {"instances": n, "concurrency": concurrency, "rounds": repeat, "rollouts": rollouts, "cpus": cpus,
            "swe_instances_per_h": round(swe_rate, 1), "plain_instances_per_h": round(plain_rate, 1),
            "ratio_to_plain_harness": round(swe_rate / plain_rate, 3),
            "megaflow_s": round(got["megaflow_s"], 2), "plain_s": round(got["plain_s"], 2),
            "megaflow_resolved": got["resolved"], "plain_passed": got["plain_ok"],
            # What MegaFlow adds per instance and sandbox slot (hops, baseline commit, restore):
            # with tests taking T seconds the ratio is about T_plain / (T_plain + this).
            "overhead_s_per_instance": round((got["megaflow_s"] - got["plain_s"]) * concurrency / n, 3),
            "plain_s_per_instance": round(got["plain_s"] * concurrency / n, 3),
            # Part of megaflow_s: checking the spec and recording the run's episodes, per run.
            "submit_s_per_run": round(got["submit_s"] / repeat, 3), **got["phases"]}
