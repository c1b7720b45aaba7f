"""`megaflow bench env --cli`, run small: both phases on the real broker, database and SmolLM2 server."""

from __future__ import annotations

import pytest
from test_model_queue import need_smollm2

from megaflow import Settings
from megaflow.bench.cli_proxy import TARGETS, format_cli_figures, run_cli_bench


@pytest.mark.integration
def test_the_cli_bench_reports_its_figures(tmp_path, pg_url, amqp_vhost):
    need_smollm2()
    figures = run_cli_bench(calls=3, in_flight=20, max_tokens=8,
                            settings=Settings(data_dir=tmp_path, database_url=pg_url, broker_url=amqp_vhost))
    # Every call was open at once, then answered; the proxy added no thread per episode.
    assert figures["cli_in_flight"] == figures["in_flight_ok"] == 20
    assert figures["threads_added"] < 20
    assert figures["proxy_tokens"] == figures["direct_tokens"] > 0  # the same greedy answers both ways
    assert 0 < figures["ratio_proxy_to_direct"] and figures["proxy_overhead_ms"] > -1000
    lines = format_cli_figures(figures)
    assert all(any(line.startswith(f"target {name} ") for line in lines) for name, _, _ in TARGETS)
