"""The arithmetic behind `bench scale`'s makespan floor, on a hand-made ledger."""

from __future__ import annotations

import datetime as dt

from megaflow.bench.scale import throughput_floor_inputs


def at(s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(1_000_000 + s, dt.UTC)


def episode(eid: str, t0: float) -> list[tuple]:
    names = ["agent.start", "provision", "agent.provision", "generate", "agent.generate", "exec", "agent.exec",
             "generate", "agent.generate", "evaluate", "agent.evaluate"]
    return [(eid, name, at(t0 + i * 0.5), 0.01) for i, name in enumerate(names)]


def test_peak_rate_is_the_busiest_window_and_the_last_phase_starts_at_the_last_model_call():
    hops = episode("a", 0.0) + episode("b", 0.2) + episode("c", 30.0)
    hops.append(("d", "agent.start", None, None))  # unfinished rows do not count
    figures = throughput_floor_inputs(hops, window_s=10.0)
    # a and b finish all 22 of their hops in the first 10 s window.
    assert figures == {"peak_hops_per_s": 2.2, "last_phase_hops": 4}


def test_no_finished_hops_gives_no_floor():
    assert throughput_floor_inputs([("a", "agent.start", None, None)]) == {}
