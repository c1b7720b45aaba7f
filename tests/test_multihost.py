"""Several env hosts on one machine: each env worker in its own network namespace.

Every "host" is a network namespace joined to the root namespace by a veth pair on
a bridge (a private /24). RabbitMQ and PostgreSQL listen on 127.0.0.1 only, so the
test forwards the bridge address's ports to them (a tiny TCP forwarder); an env
worker can reach nothing else. Model and agent workers run in the root namespace.
Sandboxes are local (bubblewrap), each host with a data directory of its own.

Each command of the scripted agent appends its step number to ``trace.txt``; the
check script accepts only ``0 1 2 … n-1``, once each, in order, plus the task's
setup having run exactly once. So a reward of 1 proves that a sandbox rebuilt on
another host by replay holds exactly what the episode did: no command lost,
none applied twice.

Needs root, ``ip netns``, bubblewrap, RabbitMQ and PostgreSQL: skips without them,
fails under CI=true.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import defaultdict

import pytest
from conftest import Cluster, need
from sqlalchemy import select

from megaflow import Client, Settings
from megaflow.db.models import Episode, Event, Hop, Host, SandboxRow, Step, utcnow
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess
from megaflow.scheduler import hosts

pytestmark = pytest.mark.integration

HOSTS = ("ns1", "ns2", "ns3")
N_CMDS = 6  # commands per episode, then submit
CHECK = ('test "$(tr "\\n" " " < trace.txt)" = "' + " ".join(str(i) for i in range(N_CMDS)) + ' " '
         '&& test "$(cat setup.log)" = "setup" && test -f seed.txt')


def spec(n_episodes: int, latency_s: float) -> dict:
    replies = [f"```bash\necho {{step}} >> trace.txt; sleep {0.3}\n```"] * N_CMDS + ["```bash\nsubmit\n```"]
    return {"name": "multihost", "rollouts": 1,
            "model": {"type": "scripted", "replies": replies, "latency_s": latency_s},
            "sandbox": {"type": "local", "memory_mb": 256},
            "limits": {"episode_timeout_s": 240, "max_steps": N_CMDS + 3},
            "tasks": [{"instance_id": f"t{i}", "instruction": "append your step", "check": CHECK,
                       "files": {"seed.txt": "seed\n"}, "setup": ["echo setup >> setup.log"]}
                      for i in range(n_episodes)]}


# -- the network: namespaces, a bridge, a forwarder ---------------------------------------------

def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Forwarder:
    """Accepts on (address, port) and pipes each connection to 127.0.0.1:port."""

    def __init__(self, address: str, port: int):
        self.port = port
        self.server = socket.create_server((address, port))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            done = threading.Semaphore(0)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()
            threading.Thread(target=self._close_after, args=(client, upstream, done), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:  # pass the end on: a killed worker's connection ends at the server too
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            done.release()

    @staticmethod
    def _close_after(a: socket.socket, b: socket.socket, done: threading.Semaphore) -> None:
        done.acquire()
        done.acquire()
        a.close()
        b.close()

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class Network:
    """A bridge in the root namespace (.1) and one namespace per host (.11, .12, ...)."""

    def __init__(self, hosts: tuple[str, ...]):
        tag = uuid.uuid4().hex[:4]
        self.bridge = f"mfb{tag}"
        used = subprocess.run(["ip", "-4", "-o", "addr"], check=False, capture_output=True, text=True).stdout
        octet = next(o for o in random.sample(range(16, 250), 234) if f"10.213.{o}." not in used)
        self.prefix = f"10.213.{octet}"
        self.root = f"{self.prefix}.1"
        self.ns = {h: f"mf{tag}{h}" for h in hosts}
        self.links: list[str] = []
        self.forwarders: list[Forwarder] = []

    def up(self) -> Network:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.root}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (host, ns) in enumerate(self.ns.items()):
            outer, inner = f"{self.bridge}o{i}", f"{self.bridge}i{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.links.append(outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("addr", "add", f"{self.prefix}.{11 + i}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        for port in (5432, 5672):
            self.forwarders.append(Forwarder(self.root, port))
        return self

    def down(self) -> None:
        for f in self.forwarders:
            f.close()
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)

    def url(self, url: str) -> str:
        """A broker or database URL as seen from a host's namespace."""
        return url.replace("127.0.0.1", self.root).replace("localhost", self.root)


def _netns_usable() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root"
    if shutil.which("ip") is None:
        return False, "no `ip` (iproute2)"
    probe = f"mfprobe{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return False, r.stderr.strip()
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return True, ""


# -- the cluster ---------------------------------------------------------------------------------

class HostsCluster(Cluster):
    """conftest's `Cluster`, whose env workers each run on a host of their own (a network namespace)."""

    def __init__(self, tmp_path, pg_url: str, amqp_url: str, net: Network):
        super().__init__(Settings(data_dir=tmp_path, database_url=pg_url, broker_url=amqp_url, host="root",
                                  sandbox_capacity=3, heartbeat_s=0.5, host_dead_after_s=4.0,
                                  reap_interval_s=2.0))
        self.net = net

    def host_settings(self, host: str) -> Settings:
        s = self.settings
        return s.model_copy(update={"host": host, "data_dir": s.data_dir / host,
                                    "broker_url": self.net.url(s.broker_url),
                                    "database_url": self.net.url(s.database_url)})

    def start_env(self, host: str, name: str | None = None) -> WorkerProcess:
        w = WorkerProcess("env", self.host_settings(host), name=name or f"env-{host}",
                          prefix=["ip", "netns", "exec", self.net.ns[host]]).start()
        self.workers[w.name] = w
        return w

    def start_all(self) -> HostsCluster:
        for pool in ("model", "agent"):
            self.start(pool)
        for host in HOSTS:
            self.start_env(host)
        with self.client.session() as s:
            wait_for(lambda: set(s.execute(select(Host.name).where(Host.state == "up")).scalars()) >= set(HOSTS),
                     60, "env hosts registering", self, poll=0.2)
            # And beating: placement takes only hosts with a fresh heartbeat.
            wait_for(lambda: {h["name"] for h in hosts.live_hosts(s, self.settings.host_dead_after_s)} >= set(HOSTS),
                     60, "env hosts heartbeating", self, poll=0.2)
        return self

    def check(self) -> None:
        for w in self.workers.values():
            if not w.alive() and w.proc.returncode not in (-signal.SIGKILL,):
                raise AssertionError(f"{w.name} exited ({w.proc.returncode}); see {w.log_path}")

    def stop(self) -> None:
        for w in self.workers.values():  # all at once: warm shutdowns overlap
            if w.alive():
                w.kill(signal.SIGCONT)
                w.kill(signal.SIGTERM)
        for w in self.workers.values():
            w.stop()


def wait_for(probe, timeout: float, what: str, cluster: HostsCluster | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if cluster is not None:
            cluster.check()
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster(tmp_path, pg_url, amqp_vhost):
    """Replaces conftest's `cluster` here: env workers on three hosts, model and agent on the root one."""
    ok, why = _netns_usable()
    need("network namespaces (ip netns)", ok, why)
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    upgrade(pg_url)
    net = Network(HOSTS).up()
    c = HostsCluster(tmp_path, pg_url, amqp_vhost, net)
    try:
        yield c.start_all()
    finally:
        c.stop()
        net.down()


# -- what the database says ----------------------------------------------------------------------

def exec_hops(s, run_id: str) -> dict[str, list[Hop]]:
    """Exec ledger rows per episode, in step order."""
    out: dict[str, list[Hop]] = defaultdict(list)
    rows = s.execute(select(Hop).join(Episode, Episode.id == Hop.subject_id)
                     .where(Episode.run_id == run_id, Hop.hop == "exec")
                     .order_by(Hop.subject_id, Hop.step_index)).scalars()
    for h in rows:
        out[h.subject_id].append(h)
    return out


def in_flight_exec(s, run_id: str, host: str) -> tuple[str, int, str] | None:
    """(episode, step, task id) of an exec hop of `host`'s episodes that is claimed, not recorded, past step 1."""
    return s.execute(select(Hop.subject_id, Hop.step_index, Hop.task_id).join(Episode, Episode.id == Hop.subject_id).where(
        Episode.run_id == run_id, Episode.host == host, Hop.hop == "exec", Hop.status == "started",
        Hop.step_index >= 2)).first()


def freeze_mid_command(client: Client, run_id: str, host: str,
                      cluster: HostsCluster) -> tuple[str, int, str]:
    """SIGSTOP `host`'s env worker while one of its commands is claimed and not recorded: (episode, step, task)."""
    worker = cluster.workers[f"env-{host}"]
    for _ in range(20):
        with client.session() as s:
            wait_for(lambda: in_flight_exec(s, run_id, host), 90, f"an exec hop in flight on {host}", cluster)
        worker.kill(signal.SIGSTOP)
        time.sleep(0.3)  # a commit already on its way lands; nothing more can
        with client.session() as s:
            hop = in_flight_exec(s, run_id, host)
        if hop is not None:
            return tuple(hop)
        worker.kill(signal.SIGCONT)
    raise AssertionError(f"never caught {host} mid-command")


def events(s, run_id: str | None, kind: str) -> list[Event]:
    stmt = select(Event).where(Event.kind == kind).order_by(Event.id)
    if run_id is not None:
        stmt = stmt.where(Event.run_id == run_id)
    return list(s.execute(stmt).scalars())


def _placement_story(client: Client, run_id: str) -> str:
    """What the database says about hosts and placement: for a failed placement assertion."""
    with client.session() as s:
        rows = [(h.name, h.state, h.capacity, h.started_at.time().isoformat(), h.heartbeat_at.time().isoformat())
                for h in s.execute(select(Host)).scalars()]
        evs = [(e.ts.time().isoformat(), e.kind, e.subject_id and e.subject_id[:6], e.data) for e in
               s.execute(select(Event).where(Event.kind.in_(("host.dead", "episode.admitted",
                                                              "episode.rehomed", "episode.waiting")))
                         .order_by(Event.id)).scalars()]
    return f"hosts {rows}; now {utcnow().time().isoformat()}; events {evs}"


def assert_completed_exactly(s, run_id: str, n: int) -> list[Episode]:
    eps = list(s.execute(select(Episode).where(Episode.run_id == run_id)).scalars())
    assert len(eps) == n
    assert {(e.state, e.reward) for e in eps} == {("succeeded", 1.0)}, [(e.state, e.exit_status, e.error)
                                                                     for e in eps]
    hops = exec_hops(s, run_id)
    for e in eps:
        steps = s.execute(select(Step.index).where(Step.episode_id == e.id).order_by(Step.index)).scalars().all()
        assert steps == list(range(N_CMDS + 1)), f"episode {e.id}: steps {steps}"
        assert [h.step_index for h in hops[e.id]] == list(range(N_CMDS)), f"episode {e.id}: exec hops"
        assert all(h.status == "done" for h in hops[e.id])
    return eps


def test_exec_hops_run_on_their_host_and_a_killed_host_recovers(cluster):
    t0 = time.monotonic()
    client = Client(cluster.settings)
    run_id = client.submit(spec(6, latency_s=0.3))
    # Kill ns1 while one of its episodes' commands is running (claimed in the ledger, not recorded).
    victim_hop = freeze_mid_command(client, run_id, "ns1", cluster)
    cluster.workers["env-ns1"].kill(signal.SIGKILL)
    killed_at, killed_ts = time.monotonic(), utcnow()
    with client.session() as s:
        at_kill = s.execute(select(Episode.id, Episode.host, Episode.state).where(Episode.run_id == run_id)).all()
        placed = {eid: host for eid, host, _ in at_kill}
        before = {eid: [(h.step_index, (h.result or {}).get("host")) for h in hs if h.status == "done"]
                  for eid, hs in exec_hops(s, run_id).items()}
    on_ns1 = {eid for eid, h in placed.items() if h == "ns1"}
    running_on_ns1 = {eid for eid, h, state in at_kill if h == "ns1" and state not in ("succeeded", "failed")}
    assert set(placed.values()) == set(HOSTS), f"placement must use every host: {placed}; {_placement_story(client, run_id)}"

    st = client.wait(run_id, timeout=120)
    took = time.monotonic() - t0
    assert st["by_state"] == {"succeeded": 6}, st
    with client.session() as s:
        eps = {e.id: e for e in assert_completed_exactly(s, run_id, 6)}
        hops = exec_hops(s, run_id)

        # Routing: before the kill, every command of an episode ran on the host it was placed on.
        for eid, done in before.items():
            assert {h for _, h in done} <= {placed[eid]}, f"episode {eid} on {placed[eid]} ran commands on {done}"
        # After: the episodes of ns1 moved, each to one live host, and ran nothing more on ns1;
        # the others never moved.
        moved = {e.subject_id: e.data for e in events(s, run_id, "episode.rehomed")}
        rehomed_after = (min(e.ts for e in events(s, run_id, "episode.rehomed")) - killed_ts).total_seconds()
        assert running_on_ns1 <= set(moved) <= on_ns1, f"re-homed {set(moved)}, on ns1 were {on_ns1}"
        assert victim_hop[0] in moved
        for eid, ep in eps.items():
            ran = [(h.step_index, h.result["host"]) for h in hops[eid]]
            if eid in moved:
                assert moved[eid]["from"] == "ns1" and moved[eid]["to"] == ep.host != "ns1"
                hosts_in_order = [h for _, h in ran]  # ns1 … ns1, then the new host only
                assert set(hosts_in_order) <= {"ns1", ep.host}, ran
                assert hosts_in_order == sorted(hosts_in_order, key=lambda h: h != "ns1"), ran
            else:
                assert {h for _, h in ran} == {placed[eid]} == {ep.host}, ran
        dead = events(s, None, "host.dead")
        assert [e.data["host"] for e in dead] == ["ns1"], "ns1 is declared dead exactly once"

        # The command ns1 was running when it died was taken over on the new host, once.
        taken = s.get(Hop, (*victim_hop[:2], "exec"))
        assert taken.status == "done" and taken.result["host"] == eps[taken.subject_id].host != "ns1"
        assert taken.task_id != victim_hop[2], \
            "the orphaned claim was taken over by the moved message (a fresh task id)"

        # Each re-homed episode's sandbox was rebuilt once, by replaying what it had executed.
        rebuilt = {e.subject_id: e.data for e in events(s, run_id, "episode.rebuilt")}
        assert victim_hop[0] in rebuilt and set(rebuilt) <= set(moved)
        for eid, info in rebuilt.items():
            assert info["host"] == eps[eid].host and info["exit_code_differs"] == []
            assert info["replayed"] == sum(1 for h in hops[eid] if h.result["host"] == "ns1")

        rows = s.execute(select(SandboxRow.episode_id, SandboxRow.host, SandboxRow.state)
                         .where(SandboxRow.run_id == run_id)).all()
        lost = [r for r in rows if r.state == "lost"]
        assert victim_hop[0] in {r.episode_id for r in lost} <= set(moved) and {r.host for r in lost} == {"ns1"}
        assert all(r.state == "destroyed" for r in rows if r.host != "ns1")

    # ns1 comes back: its reaper destroys the sandboxes it left behind; nothing leaks.
    cluster.start_env("ns1", name="env-ns1-again")
    with client.session() as s:
        wait_for(lambda: not s.execute(select(SandboxRow.id).where(SandboxRow.destroyed_at.is_(None))).first(),
                 30, "ns1's lost sandboxes to be reaped", cluster, poll=0.2)
        # The reaper's first round runs as the worker starts, before it joins: wait for the join too.
        wait_for(lambda: s.execute(select(Host.state).where(Host.name == "ns1")).scalar() == "up",
                 30, "ns1 to join again", cluster, poll=0.2)
    for host in HOSTS:
        root = cluster.settings.data_dir / host / "sandboxes"
        left = [p.name for p in root.iterdir() if p.name.startswith("mf-")] if root.exists() else []
        assert left == [], f"{host} leaked sandboxes {left}"
    print(f"\nmultihost/SIGKILL: run {took:.1f}s, completed {took - (killed_at - t0):.1f}s after the kill; "
          f"first re-homed {rehomed_after:.1f}s after it; re-homed {len(moved)}; "
          f"rebuilt replaying {sorted(i['replayed'] for i in rebuilt.values())} commands")


def test_a_frozen_host_declared_dead_runs_nothing_twice(cluster):
    """ns2 freezes (SIGSTOP) holding unacknowledged hops, is declared dead, then wakes up.

    Its episodes move on; what it still held must not run (or record) a second time:
    the command it was running is taken over elsewhere and its own late result is
    refused (its claim was orphaned); the hops it had prefetched find their episode
    on another host and forward themselves there.
    """
    t0 = time.monotonic()
    client = Client(cluster.settings)
    run_id = client.submit(spec(6, latency_s=0.3))
    ns2 = cluster.workers["env-ns2"]
    frozen_hop = freeze_mid_command(client, run_id, "ns2", cluster)
    with client.session() as s:
        on_ns2 = set(s.execute(select(Episode.id).where(Episode.run_id == run_id, Episode.host == "ns2"))
                     .scalars())
        wait_for(lambda: {e.subject_id for e in events(s, run_id, "episode.rehomed")} >= on_ns2, 30,
                 "ns2's episodes to be re-homed", cluster, poll=0.2)
        time.sleep(1.0)  # let the other episodes' hops queue up on the frozen host's channel
    ns2.kill(signal.SIGCONT)

    st = client.wait(run_id, timeout=120)
    assert st["by_state"] == {"succeeded": 6}, st
    with client.session() as s:
        eps = {e.id: e for e in assert_completed_exactly(s, run_id, 6)}
        taken = s.get(Hop, (*frozen_hop[:2], "exec"))
        assert taken.result["host"] == eps[taken.subject_id].host != "ns2", "ns2's late result was not recorded"
        assert taken.task_id != frozen_hop[2], "taken over by the forwarded copy"
        forwarded = [e.data for e in events(s, None, "hop.forwarded")]
        assert forwarded and all(f["from"] == "ns2" for f in forwarded), forwarded
        assert "ClaimLost" in {f["why"] for f in forwarded}, "the woken command found its claim orphaned"
        # After the re-homing, nothing of ns2's episodes was recorded as run on ns2.
        moved_at = {e.subject_id: e.ts for e in events(s, run_id, "episode.rehomed")}
        for eid in on_ns2:
            late = [h for h in exec_hops(s, run_id)[eid] if h.finished_at > moved_at[eid]]
            assert all(h.result["host"] == eps[eid].host for h in late), [(h.step_index, h.result) for h in late]
        # ns2 is alive again and a host like any other.
        wait_for(lambda: s.execute(select(Host.state).where(Host.name == "ns2")).scalar() == "up", 10,
                 "ns2 back up", cluster)
        wait_for(lambda: not s.execute(select(SandboxRow.id).where(SandboxRow.destroyed_at.is_(None))).first(),
                 30, "ns2's abandoned sandboxes to be reaped", cluster, poll=0.2)
    print(f"\nmultihost/SIGSTOP: run {time.monotonic() - t0:.1f}s; {len(forwarded)} hops forwarded "
          f"({sorted(f['why'] for f in forwarded)})")
