"""A self-contained HTML report of one run: summary tables and plots embedded as base64 PNGs.

Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas, never
through ``pyplot``: no global figure state, no display backend, safe in any
thread. ``pip install 'megaflow[ops]'`` brings matplotlib.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import statistics
from collections.abc import Sequence
from pathlib import Path

from megaflow.ops.stats import RunData

#: One colour per episode state, shared by every plot and table.
STATE_COLOURS = {
    "pending": "#bdbdbd", "waiting": "#fdae6b", "provisioning": "#9ecae1", "running": "#3182bd", "evaluating": "#756bb1",
    "succeeded": "#31a354", "failed": "#e6550d", "infra_failed": "#a50f15", "cancelled": "#636363",
}


def _figure(width: float = 8.0, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _seconds(t: dt.datetime, origin: dt.datetime) -> float:
    return (t - origin).total_seconds()


def _origin(data: RunData) -> dt.datetime | None:
    times = [t for e in data.episodes for t in (e.started_at, e.finished_at) if t is not None]
    return min(times) if times else None


def plot_timeline(data: RunData) -> str | None:
    """Episodes in flight (started, not finished) and episodes finished per second, over the run."""
    origin = _origin(data)
    if origin is None:
        return None
    starts = sorted(_seconds(e.started_at, origin) for e in data.episodes if e.started_at)
    ends = sorted(_seconds(e.finished_at, origin) for e in data.episodes if e.finished_at)
    # In-flight count as a step function: +1 at each start, -1 at each end of a started episode.
    changes = sorted([(_seconds(e.started_at, origin), 1) for e in data.episodes if e.started_at]
                     + [(_seconds(e.finished_at, origin), -1) for e in data.episodes
                        if e.started_at and e.finished_at])
    xs, ys, level = [0.0], [0], 0
    for t, d in changes:
        level += d
        xs.append(t)
        ys.append(level)
    span = max([*ends, *starts, 1e-3])
    fig = _figure(8, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.step(xs, ys, where="post", color=STATE_COLOURS["running"])
    top.set_ylabel("episodes in flight")
    top.set_title("Concurrency and throughput")
    top.grid(alpha=0.3)
    n_bins = max(1, min(60, len(ends)))
    width = span / n_bins
    bottom.hist(ends, bins=n_bins, range=(0, span), weights=[1 / width] * len(ends),
                color=STATE_COLOURS["succeeded"], alpha=0.8)
    bottom.set_ylabel("episodes finished / s")
    bottom.set_xlabel("seconds since the first episode started")
    bottom.grid(alpha=0.3)
    return _png(fig)


def plot_hop_latency(data: RunData) -> str | None:
    """Box plots of each hop's work time (log scale): where an episode's time goes."""
    hops = sorted(data.hop_durations, key=lambda h: statistics.median(data.hop_durations[h]))
    if not hops:
        return None
    fig = _figure(8, 0.5 + 0.45 * len(hops))
    ax = fig.subplots()
    values = [[max(v, 1e-5) for v in data.hop_durations[h]] for h in hops]
    ax.boxplot(values, orientation="horizontal", whis=(5, 95), showfliers=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(hops) + 1), [f"{h} (n={len(data.hop_durations[h])})" for h in hops])
    ax.set_xscale("log")
    ax.set_xlabel("seconds (box: quartiles, whiskers: 5th-95th percentile)")
    ax.set_title("Hop latency")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def plot_rewards(data: RunData) -> str | None:
    """Histogram of the rewards the mean counts (`megaflow.db.run_stats.summarize`)."""
    stats = data.stats()
    rewards = list(stats.rewards)
    if not rewards:
        return None
    fig = _figure(6, 3)
    ax = fig.subplots()
    lo, hi = min(rewards), max(rewards)
    ax.hist(rewards, bins=min(20, max(1, len(set(rewards)) * 2)), range=(lo - 0.5, hi + 0.5) if lo == hi else None,
            color="#3182bd", edgecolor="white")
    ax.set_xlabel("reward")
    ax.set_ylabel("episodes")
    ax.set_title(f"Rewards (n={len(rewards)}, mean {stats.mean_reward:.3f})")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_failures(data: RunData) -> str | None:
    """Failed and infra-failed episodes by exit status."""
    failures = data.failures()
    if not failures:
        return None
    kinds = list(failures)[::-1]
    fig = _figure(6, 0.8 + 0.4 * len(kinds))
    ax = fig.subplots()
    ax.barh(kinds, [failures[k] for k in kinds], color=STATE_COLOURS["failed"])
    ax.set_xlabel("episodes")
    ax.set_title("Failures by kind (exit status)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_rows(data: RunData) -> list[tuple[str, object]]:
    ends = [e.finished_at for e in data.episodes if e.finished_at]
    span = data.span_s
    mean_reward = data.stats().mean_reward
    rows: list[tuple[str, object]] = [
        ("run", f"{data.name} ({data.run_id})"), ("status", data.status), ("episodes", len(data.episodes)),
        ("steps", data.steps), ("tokens", sum(e.tokens for e in data.episodes)),
    ]
    if span:
        # The window the watch's closing line names "whole run" (`megaflow.ops.stats.run_span_s`),
        # so the report and the CLI give one figure; the live panel's is over its last seconds.
        rows += [("whole run (first episode created to last finished)", f"{span:.1f} s"),
                 ("episodes / s (whole run)", f"{len(ends) / span:.2f}"),
                 ("steps / s (whole run)", f"{data.steps / span:.2f}")]
    if mean_reward is not None:
        rows.append(("mean reward", f"{mean_reward:.3f}"))
    return rows


#: The hop table's columns: work time (claim or start to record) beside queue wait (publish to start).
HOP_HEADER = ("hop", "n", "work p50 ms", "work p90 ms", "work p99 ms", "work max ms",
              "queued p50 ms", "queued p90 ms", "queued p99 ms")


def _hop_rows(data: RunData) -> list[tuple[object, ...]]:
    rows = []
    for hop, values in sorted(data.hop_durations.items()):
        queued = data.hop_queued.get(hop)
        # Hops recorded without a publish stamp (older rows, direct calls) have no queue wait.
        waits = [f"{_quantile(queued, q) * 1e3:.1f}" if queued else "-" for q in (0.5, 0.9, 0.99)]
        rows.append((hop, len(values), *(f"{_quantile(values, q) * 1e3:.1f}" for q in (0.5, 0.9, 0.99)),
                     f"{max(values) * 1e3:.1f}", *waits))
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6} img{max-width:100%;display:block;margin:.5em 0} .muted{color:#777}
.state{display:inline-block;width:.8em;height:.8em;margin-right:.4em;border-radius:2px}
"""


#: Graded episodes listed in the report's grading table.
GRADED_ROWS = 500


def render_html(data: RunData, generated_at: dt.datetime | None = None, training: list[dict] | None = None) -> str:
    """The report of `data` as one HTML document with every image inline (`training`: see `training_steps`)."""
    generated_at = generated_at or dt.datetime.now(dt.UTC)
    parts = [(f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
              f"<title>MegaFlow run {html.escape(data.name)}</title><style>{_CSS}</style></head><body>"),
             f"<h1>MegaFlow run report: {html.escape(data.name)}</h1>",
             f"<p class='muted'>run {html.escape(data.run_id)} · generated {generated_at:%Y-%m-%d %H:%M:%S} UTC</p>",
             "<h2>Summary</h2>", _table(("", ""), _summary_rows(data))]
    states = "".join(f"<tr><td><span class='state' style='background:{STATE_COLOURS.get(s, '#999')}'></span>"
                     f"{html.escape(s)}</td><td>{n}</td></tr>" for s, n in data.by_state().items())
    parts += ["<h2>Episodes by state</h2>", f"<table><tbody>{states}</tbody></table>"]
    sections = [
        ("Concurrency and throughput", plot_timeline(data), "no episode started"),
        ("Hop latency", plot_hop_latency(data), "no hop recorded"),
        ("Rewards", plot_rewards(data), "no episode has finished yet"),
        ("Failures by kind", plot_failures(data), "no failed episode"),
    ]
    for title, png, empty in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            parts.append(f"<p class='muted'>{html.escape(empty)}</p>")
        else:
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
        if title == "Hop latency" and data.hop_durations:
            parts.append(_table(HOP_HEADER, _hop_rows(data)))
        if title == "Failures by kind" and data.failures():
            parts.append(_table(("exit status", "episodes"), list(data.failures().items())))
    if training:
        parts += _training_section(training)
    graded = [e for e in data.episodes if e.grading and e.grading.get("tests_status")]
    if graded:
        from megaflow.swebench_report import grading_summary

        rows = []
        for e in graded[:GRADED_ROWS]:
            g = grading_summary(e.grading)
            rows.append((e.instance_id, "" if e.reward is None else f"{e.reward:g}", g["resolved"],
                         g["patch_applied"], " ".join(g["f2p_failure"])[:300] or "-",
                         " ".join(g["p2p_failure"])[:300] or "-"))
        parts += ["<h2>Grading</h2>", _table(("instance", "reward", "resolved", "test patch applied",
                                               "FAIL_TO_PASS failing", "PASS_TO_PASS failing"), rows)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(session, run_id: str, out: str | Path) -> int:
    """Write the HTML report of a run to `out` (a path).

    Returns:
        The number of bytes written.

    Raises:
        LookupError: no such run.
        ImportError: matplotlib is not installed (``pip install 'megaflow[ops]'``).
    """
    from megaflow.ops.stats import load_run

    try:
        import matplotlib  # noqa: F401  (fail before reading the database)
    except ImportError as exc:
        raise ImportError("the run report needs matplotlib: pip install 'megaflow[ops]'") from exc
    document = render_html(load_run(session, run_id), training=training_steps(session, run_id))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return len(document.encode("utf-8"))


# -- the RL trainer's steps on this run (issue 18) ------------------------------


def training_steps(session, run_id: str) -> list[dict]:
    """What `megaflow train` published with each policy version of the run's ``rl.policy``.

    One dict per training step (its ``meta``: step, mean_reward, format_error_rate, loss,
    sampled_versions, timings) plus ``policy_version``; [] for a run nobody trained on.
    """
    from sqlalchemy import select

    from megaflow.db.models import PolicyVersion, Run

    run = session.get(Run, run_id)
    policy = ((run.spec or {}).get("rl") or {}).get("policy") if run is not None else None
    if not policy:
        return []
    rows = session.execute(select(PolicyVersion).where(PolicyVersion.policy == policy)
                           .order_by(PolicyVersion.version)).scalars()
    return [{**r.meta, "policy_version": r.version} for r in rows if isinstance(r.meta, dict) and "step" in r.meta]


def plot_training(steps: list[dict]) -> str | None:
    """Mean reward and format-error rate of each step's batch, and the policy version it published."""
    if not steps:
        return None
    x = [s["step"] for s in steps]
    fig = _figure(8, 3.4)
    ax = fig.subplots()
    ax.plot(x, [s.get("mean_reward", 0.0) for s in steps], marker="o", color="#31a354", label="mean reward")
    ax.plot(x, [s.get("format_error_rate", 0.0) for s in steps], marker="s", color="#e6550d",
            label="format-error rate")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward / rate")
    ax.grid(alpha=0.3)
    versions = ax.twinx()
    versions.step(x, [s["policy_version"] for s in steps], where="post", color="#636363", alpha=0.6,
                  label="policy version published")
    versions.set_ylabel("policy version")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    versions.yaxis.set_major_locator(MaxNLocator(integer=True))
    lines = ax.get_legend_handles_labels()
    more = versions.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title("Training (megaflow train): each step's batch")
    return _png(fig)


def _training_section(steps: list[dict]) -> list[str]:
    png = plot_training(steps)
    rows = [(s["step"], s["policy_version"], ",".join(map(str, s.get("sampled_versions", []))),
             s.get("episodes", ""), f"{s.get('mean_reward', 0.0):+.3f}", f"{s.get('format_error_rate', 0.0):.0%}",
             f"{s.get('loss', 0.0):+.4f}") for s in steps]
    return ["<h2>Training</h2>", f"<img alt='Training' src='data:image/png;base64,{png}'>",
            _table(("step", "version published", "sampled by versions", "episodes", "mean reward",
                    "format-error rate", "loss"), rows)]
