"""Figures of a run: memory per rank, throughput per layout, the pipeline timeline, collectives.

Each function returns a :class:`matplotlib.figure.Figure` made without pyplot, so nothing is
left in pyplot's global list of figures (no leak, no duplicate display); a notebook shows the
returned figure, a script saves it with ``fig.savefig(path)``.

Engines on several hosts: each figure of ranks groups them by host, with the host's name
under (or beside) its ranks and a dotted line between hosts; on one host nothing is added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from .layout import ranks_by_host
from .protocol import MEMORY_PARTS, Event

GIB = 1024**3
UNITS = (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024), ("bytes", 1))


class PlotFigure(Figure):
    """A Figure that shows itself as a PNG in a notebook.

    IPython renders a bare Figure as an image only once pyplot's inline backend has
    registered its formatter; without pyplot it would show ``<Figure size ...>``.
    """

    def _repr_png_(self) -> bytes:
        from io import BytesIO

        buffer = BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


PART_COLOURS = {"weights": "#1f77b4", "kv_cache": "#ff7f0e", "activations": "#2ca02c", "other": "#c7c7c7"}
PHASE_COLOURS = {"prefill": "#1f77b4", "decode": "#2ca02c", "loading": "#b8860b", "idle": "#c7c7c7"}


def _is_result(value: Any) -> bool:
    """A run's result (:class:`mpbook.results.RunResult`), told by what it carries: this
    module draws results without importing them (results imports the plots)."""
    return all(hasattr(value, name) for name in ("timeline", "peak_memory_bytes", "collectives", "record"))


def _by_rank(per_rank: Mapping[int, Any] | Sequence[Mapping[str, Any]]) -> dict[int, Any]:
    """Accept {rank: value} or a list of dicts that carry "rank" (e.g. telemetry snapshots)."""
    if isinstance(per_rank, Mapping):
        return {int(r): v for r, v in per_rank.items()}
    return {int(item["rank"]): item for item in per_rank}


# --------------------------------------------------------------------------- hosts
def _hosts(source: Any, by_rank: Mapping[int, Any] | None, hosts: Sequence[str] | None) -> dict[int, str]:
    """Each rank's host: ``hosts`` (by rank) when given, else a result's, else the snapshots' own."""
    if hosts is not None:
        return dict(enumerate(hosts))
    if _is_result(source):
        return dict(enumerate(getattr(source, "hosts", None) or []))
    return {r: v.get("host", "") for r, v in (by_rank or {}).items() if isinstance(v, Mapping)}


def _host_groups(order: Sequence[int], hosts: Mapping[int, str]) -> list[tuple[str, list[int]]]:
    """The ranks of ``order`` in runs by host, when they are on several hosts; else []."""
    runs = ranks_by_host([hosts.get(r, "") for r in order])
    if len({host for host, _ in runs}) < 2:
        return []
    return [(host, [order[i] for i in positions]) for host, positions in runs]


def _mark_hosts_on_x(ax, groups: list[tuple[str, list[int]]]) -> None:
    """A bar chart by rank: each host's name under its ranks' labels, a dotted line between hosts."""
    if not groups:
        return
    for (_, before), (_, after) in zip(groups, groups[1:]):
        ax.axvline((before[-1] + after[0]) / 2, color="#999999", linewidth=0.8, linestyle=":")
    names = ax.secondary_xaxis("bottom")
    names.set_xticks([(ranks[0] + ranks[-1]) / 2 for _, ranks in groups], [host for host, _ in groups],
                     fontweight="bold")
    names.tick_params(length=0, pad=18)  # below the ranks' own labels
    names.spines["bottom"].set_visible(False)


def _mark_hosts_on_rows(ax, groups: list[tuple[str, list[int]]]) -> None:
    """A chart with one row per position (top to bottom): each host's name beside its rows."""
    if not groups:
        return
    starts = [0]
    for _, rows in groups:
        starts.append(starts[-1] + len(rows))
    for start in starts[1:-1]:
        ax.axhline(start - 0.5, color="#999999", linewidth=0.8, linestyle=":")
    names = ax.secondary_yaxis("right")
    names.set_yticks([(a + b - 1) / 2 for a, b in zip(starts, starts[1:])], [host for host, _ in groups],
                     fontweight="bold")
    names.tick_params(length=0)
    names.spines["right"].set_visible(False)


# --------------------------------------------------------------------------- memory
def plot_memory(
    per_rank: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    ax=None,
    title: str = "memory per rank",
    unit: str | None = None,
    hosts: Sequence[str] | None = None,
) -> Figure:
    """Memory per rank, stacked into weights, KV cache and activations where known.

    ``per_rank``: a run's result, {rank: figures} or a list of telemetry snapshots. Figures in bytes:
    ``weights``, ``kv_cache``, ``activations`` (or a snapshot's ``memory_parts``), ``total``
    (or a snapshot's ``memory_in_use_bytes``) and ``peak`` (``peak_memory_bytes``). What the
    total holds beyond the known parts is drawn as "other"; the peak as a tick above the bar.
    ``ax``: draw into this Axes (e.g. one panel per layout of a comparison) and return its figure.
    ``unit``: "GiB", "MiB", "KiB" or "bytes" (default: the largest that the largest bar reaches;
    give one to panels that share an axis).
    ``hosts``: each rank's host (default: the result's, or the snapshots' own).
    """
    ranks = _memory_of_result(per_rank) if _is_result(per_rank) else _by_rank(per_rank)
    if not ranks:
        raise ValueError("plot_memory: no ranks given; pass {rank: {'weights': bytes, ...}} or snapshots")
    if ax is None:
        fig = PlotFigure(figsize=(max(4.0, 0.9 * len(ranks) + 2), 3.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    order = sorted(ranks)
    bottoms = [0.0] * len(order)
    drawn = set()
    parts_of = {r: {**ranks[r].get("memory_parts", {}), **{p: ranks[r][p] for p in MEMORY_PARTS if p in ranks[r]}} for r in order}
    totals = {r: ranks[r].get("total", ranks[r].get("memory_in_use_bytes")) for r in order}
    # The unit follows the largest bar: a small model's weights are KiB, a process's peak GiB.
    largest = max(
        max(sum(parts_of[r].values()), totals[r] or 0, ranks[r].get("peak", ranks[r].get("peak_memory_bytes")) or 0)
        for r in order
    )
    if unit is None:
        unit, scale = next(((u, b) for u, b in UNITS if largest >= b), UNITS[-1])
    elif unit in dict(UNITS):
        scale = dict(UNITS)[unit]
    else:
        raise ValueError(f"plot_memory: unit={unit!r}; use one of {', '.join(u for u, _ in UNITS)}")
    for part in (*MEMORY_PARTS, "other"):
        heights = []
        for r in order:
            if part == "other":
                known = sum(parts_of[r].values())
                total = totals[r]
                heights.append(max(0.0, (total or 0) - known) / scale)
            else:
                heights.append(parts_of[r].get(part, 0) / scale)
        if any(heights):
            ax.bar(order, heights, bottom=bottoms, label=part.replace("_", " "), color=PART_COLOURS[part], width=0.6)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
            drawn.add(part)
    peaks = [(r, ranks[r].get("peak", ranks[r].get("peak_memory_bytes"))) for r in order]
    peaks = [(r, p / scale) for r, p in peaks if p]
    if peaks:
        ax.scatter([r for r, _ in peaks], [p for _, p in peaks], marker="_", s=400, color="#d62728", label="peak", zorder=3)
    ax.set_xticks(order, [f"rank {r}" for r in order])
    _mark_hosts_on_x(ax, _host_groups(order, _hosts(per_rank, ranks, hosts)))
    ax.set_ylabel(unit)
    ax.set_title(title)
    if drawn or peaks:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _memory_of_result(result) -> dict[int, dict[str, int]]:
    """Per rank: weights and KV cache, and the run's peak above them (activations on a GPU; on
    a CPU engine the peak is the process's, runtime included, so no part of it is named)."""
    per_rank = {}
    for rank, (weights, kv, peak) in enumerate(zip(result.weight_bytes, result.kv_cache_bytes, result.peak_memory_bytes)):
        parts = {"weights": weights, "kv_cache": kv, "total": peak, "peak": peak}
        if result.device_type == "cuda":
            parts["activations"] = max(0, peak - weights - kv)
        per_rank[rank] = parts
    return per_rank


# --------------------------------------------------------------------------- throughput
def _layout_label(rec: Mapping[str, Any]) -> str:
    dims = [f"{d}{rec[d]}" for d in ("dp", "pp", "tp") if rec.get(d, 1) != 1] or ["1 device"]
    return f"{rec.get('strategy', '?')} ({' '.join(dims)})"


def plot_throughput(records: Iterable[Mapping[str, Any]] | Any) -> Figure:
    """Prefill and decode tokens/s per strategy and layout, from runs' results or benchmark
    records (one result alone draws its own two bars).

    Each record: ``strategy``, ``dp``, ``pp``, ``tp``, ``prefill_tokens_per_s``,
    ``decode_tokens_per_s``. Prefill runs orders of magnitude faster than decode, so each
    gets its own panel (and scale).
    """
    if _is_result(records):
        records = [records]
    records = [r.record() if _is_result(r) else r for r in records]
    if not records:
        raise ValueError("plot_throughput: no records; pass dicts with strategy, dp, pp, tp and tokens/s")
    labels = [_layout_label(r) for r in records]
    fig = PlotFigure(figsize=(9.0, 0.45 * len(records) + 1.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title, colour in (
        (axes[0], "prefill_tokens_per_s", "prefill", PHASE_COLOURS["prefill"]),
        (axes[1], "decode_tokens_per_s", "decode", PHASE_COLOURS["decode"]),
    ):
        values = [float(r.get(key) or 0.0) for r in records]
        bars = ax.barh(range(len(records)), values, color=colour)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in values], padding=3, fontsize="small")
        ax.set_title(f"{title} tokens/s")
        ax.margins(x=0.2)
    axes[0].set_yticks(range(len(records)), labels)
    axes[0].invert_yaxis()
    return fig


# --------------------------------------------------------------------------- timeline
def _aligned(events: Iterable[Event]) -> list[tuple[Event, float, float]]:
    """(event, start, end) on one clock for every rank, in seconds since the earliest start."""
    spans = [(e, e.run_began + e.start, e.run_began + e.end) for e in events]
    t0 = min((s for _, s, _ in spans), default=0.0)
    return [(e, s - t0, t - t0) for e, s, t in spans]


def bubble_fraction(events: Sequence[Event]) -> float:
    """Measured idle share of the ranks between the first start and the last end.

    Each rank is a worker of its stage (ranks of one stage under tensor parallel work side by
    side, and replicas are pipelines of their own), so each rank's busy time counts once."""
    spans = _aligned(events)
    if not spans:
        return 0.0
    first = min(s for _, s, _ in spans)
    span = max(t for _, _, t in spans) - first
    ranks = sorted({e.rank for e, _, _ in spans})
    if span <= 0:
        return 0.0
    busy = 0.0
    for rank in ranks:
        # Union of this rank's intervals: overlapping bars must not count twice.
        covered = first
        for _, s, t in sorted((x for x in spans if x[0].rank == rank), key=lambda x: x[1]):
            if t > covered:
                busy += t - max(s, covered)
                covered = t
    return 1.0 - busy / (span * len(ranks))


def gpipe_bubble(p: int, m: int) -> float:
    """GPipe's idle share for ``p`` stages and ``m`` micro-batches of equal cost: (p-1)/(m+p-1)."""
    return (p - 1) / (m + p - 1)


TIMELINE_PHASES = ("prefill", "decode")
LABEL_PX_PER_CHAR = 6.5  # a micro-batch's number in x-small type, and room around it
THIN_PX = 3.0  # bars narrower than this lose their white edge (it would hide them)


def _timeline_phrase(events: Sequence[Event]) -> str:
    """``"prefill and 15 decode steps"``: what the chart holds, named for its title."""
    parts = []
    if any(e.phase == "prefill" for e in events):
        parts.append("prefill")
    per_bar: dict[tuple[int, int], int] = {}
    for e in events:
        if e.phase == "decode":
            per_bar[(e.rank, e.microbatch)] = per_bar.get((e.rank, e.microbatch), 0) + 1
    if per_bar:
        steps = max(per_bar.values())
        parts.append(f"{steps} decode step{'s' if steps != 1 else ''}")
    return " and ".join(parts)


def plot_timeline(run: Any, phase: str | None = None, *, hosts: Sequence[str] | None = None) -> Figure:
    """The pipeline as a Gantt chart: one row per rank (its stage), one bar per micro-batch
    and step, coloured by micro-batch.

    ``run``: a run's result, or its timeline (the :class:`~mpbook.protocol.Event` list).
    ``phase``: "prefill" or "decode" alone; by default both, the prefill and then every
    decode step. A bar carries its micro-batch's number where the number fits in it (a long
    decode has hundreds of thin bars). The title names what is drawn, and the measured
    bubble of each phase next to GPipe's (p-1)/(m+p-1) for the run's p stages and m
    micro-batches. Ranks on several hosts (``hosts`` by rank, default the result's): each
    host's rows together, its stages in order, the host named beside them.
    """
    events = list(run.timeline if _is_result(run) else run)
    if phase is not None:
        if phase not in TIMELINE_PHASES:
            raise ValueError(f"plot_timeline: phase={phase!r}; use one of {', '.join(TIMELINE_PHASES)}, or None for both")
        events = [e for e in events if e.phase == phase]
    if not events:
        raise ValueError("plot_timeline: no events; a pipeline run records them with telemetry.event(...)"
                         + (f" (none in the {phase})" if phase else ""))
    stages = sorted({e.stage for e in events})
    host_of = _hosts(run, None, hosts)
    groups = _host_groups(sorted({e.rank for e in events}), host_of)
    first_run = {r: i for i, (_, members) in enumerate(groups) for r in members}
    ranks = sorted({e.rank for e in events},
                   key=lambda r: (first_run.get(r, 0), min(e.stage for e in events if e.rank == r), r))
    groups = [(host, [r for r in ranks if first_run[r] == i]) for i, (host, _) in enumerate(groups)]
    one_rank_a_stage = len(ranks) == len(stages)
    microbatches = sorted({e.microbatch for e in events})
    p, m = len(stages), len(microbatches)
    spans = _aligned(events)
    width_in = 9.0
    fig = PlotFigure(figsize=(width_in, 0.6 * len(ranks) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    end_ms = max(t for _, _, t in spans) * 1000
    ax.set_xlim(0, end_ms * 1.01 or 1.0)
    # Pixels per millisecond, near enough to decide which numbers fit (the axes take most of
    # the figure's width; the rest is the row labels).
    px_per_ms = 0.8 * width_in * fig.dpi / (end_ms * 1.01 or 1.0)
    _draw_bars(ax, ranks, spans, microbatches, px_per_ms)
    names = {r: f"stage {min(e.stage for e in events if e.rank == r)}" for r in ranks}
    ax.set_yticks(range(len(ranks)), [names[r] if one_rank_a_stage else f"{names[r]} · rank {r}" for r in ranks])
    ax.invert_yaxis()
    _mark_hosts_on_rows(ax, groups)
    ax.set_xlabel("ms since the first step began")
    phases = [ph for ph in TIMELINE_PHASES if any(e.phase == ph for e in events)]
    if len(phases) > 1:
        _mark_decode_start(ax, spans)
    ax.set_title(
        f"pipeline timeline, {_timeline_phrase(events)}: p={p} stage{'s' if p != 1 else ''}, "
        f"m={m} micro-batch{'es' if m != 1 else ''}\n"
        f"{_bubble_line(events, phases, ranks, microbatches)}",
        fontsize="medium",
        pad=14 if len(phases) > 1 else 6,
    )
    return fig


def _draw_bars(ax, ranks: list[int], spans, microbatches: list[int], px_per_ms: float) -> None:
    """One rectangle per (micro-batch, step) of each rank's row, coloured by micro-batch, with
    the micro-batch's number where it fits."""
    cmap = _colours(len(microbatches))
    for row, rank in enumerate(ranks):
        bars = sorted((x for x in spans if x[0].rank == rank), key=lambda x: x[1])
        lefts = [s * 1000 for _, s, _ in bars]
        widths = [(t - s) * 1000 for _, s, t in bars]
        thin = [w * px_per_ms < THIN_PX for w in widths]
        ax.barh(
            [row] * len(bars),
            widths,
            left=lefts,
            height=0.8,
            color=[cmap[microbatches.index(e.microbatch)] for e, _, _ in bars],
            edgecolor="white",
            linewidth=[0.0 if t else 0.5 for t in thin],
        )
        for (e, _, _), x, w in zip(bars, lefts, widths):
            label = str(e.microbatch)
            if w * px_per_ms >= LABEL_PX_PER_CHAR * (len(label) + 1):
                ax.text(x + w / 2, row, label, ha="center", va="center", fontsize="x-small", color="white")


def _mark_decode_start(ax, spans) -> None:
    """A dashed line where the decode begins (the prefill's last bar ends there), named on each side."""
    decode_from = min(s for e, s, _ in spans if e.phase == "decode") * 1000
    ax.axvline(decode_from, color="#555555", linewidth=0.8, linestyle="--")
    above = ax.get_xaxis_transform()  # x in ms, y in the axes' height: just above the rows
    ax.text(decode_from, 1.01, "← prefill ", transform=above, ha="right", va="bottom", fontsize="x-small", color="#555555")
    ax.text(decode_from, 1.01, " decode →", transform=above, ha="left", va="bottom", fontsize="x-small", color="#555555")


def _bubble_line(events, phases: list[str], ranks: list[int], microbatches: list[int]) -> str:
    """Each phase's measured bubble, then its theory for this schedule."""
    p, m = len({e.stage for e in events}), len(microbatches)
    measured = ", ".join(f"{ph} {bubble_fraction([e for e in events if e.phase == ph]):.0%}" for ph in phases)
    theory = []
    if "prefill" in phases:
        theory.append(f"prefill {gpipe_bubble(p, m):.0%} (GPipe, (p-1)/(m+p-1))")
    if "decode" in phases:
        from .parallel.pipeline import interleaved_bubble

        steps = max((len([e for e in events if e.phase == "decode" and e.rank == r and e.microbatch == mb])
                     for r in ranks for mb in microbatches), default=0)
        theory.append(f"decode {interleaved_bubble(p, m, steps):.0%} (interleaved, {steps} steps)")
    return f"bubble measured: {measured} · in theory: {', '.join(theory)}"


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


# --------------------------------------------------------------------------- collectives
def plot_collectives(
    counts: Mapping[int, Mapping[str, int]] | Sequence[Mapping[str, Any]],
    seconds: Mapping[int, float | Mapping[str, float]] | None = None,
    *,
    hosts: Sequence[str] | None = None,
) -> Figure:
    """Collectives per rank: how many of each kind, and the seconds spent in them.

    ``counts``: a run's result, {rank: {kind: count}} or telemetry snapshots (which also give
    the seconds). ``seconds``: {rank: seconds} or {rank: {kind: seconds}}. One legend for both
    panels, under them, so that it covers no bar. ``hosts``: each rank's host (default: the
    result's, or the snapshots' own).
    """
    if _is_result(counts):
        hosts = hosts if hosts is not None else (getattr(counts, "hosts", None) or None)
        counts, seconds = dict(enumerate(counts.collectives)), dict(enumerate(counts.collective_seconds))
    by_rank = _by_rank(counts)
    if not by_rank:
        raise ValueError("plot_collectives: no ranks given; pass {rank: {'all_reduce': n, ...}} or snapshots")
    if seconds is None:
        seconds = {
            r: v.get("collective_seconds_by_kind") or v.get("collective_seconds", 0.0)
            for r, v in by_rank.items()
            if isinstance(v, Mapping) and "collectives" in v
        }
    counts_of = {r: (v.get("collectives", {}) if "collectives" in v else v) for r, v in by_rank.items()}
    order = sorted(counts_of)
    kinds = sorted({k for c in counts_of.values() for k in c})
    fig = PlotFigure(figsize=(9.0, 3.2), layout="constrained")
    ax_n, ax_s = fig.subplots(1, 2)
    colours = dict(zip(kinds, _colours(len(kinds))))
    bottom = [0] * len(order)
    for kind in kinds:
        heights = [counts_of[r].get(kind, 0) for r in order]
        ax_n.bar(order, heights, bottom=bottom, label=kind, color=colours[kind], width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_n.set_title("collectives (count)")
    ax_n.set_xticks(order, [f"rank {r}" for r in order])
    seconds = seconds or {}
    bottom_s = [0.0] * len(order)
    per_kind = any(isinstance(v, Mapping) for v in seconds.values())
    for kind in kinds if per_kind else [None]:
        if kind is None:
            heights = [float(seconds.get(r, 0.0)) for r in order]
        else:
            heights = [float(seconds.get(r, {}).get(kind, 0.0)) for r in order]
        ax_s.bar(order, heights, bottom=bottom_s, color=colours.get(kind, "#555555"), width=0.6, label=kind or "all")
        bottom_s = [b + h for b, h in zip(bottom_s, heights)]
    ax_s.set_title("time in collectives (s)" + ("" if per_kind or not kinds else ", all kinds"))
    ax_s.set_xticks(order, [f"rank {r}" for r in order])
    groups = _host_groups(order, _hosts(None, by_rank, hosts))
    _mark_hosts_on_x(ax_n, groups)
    _mark_hosts_on_x(ax_s, groups)
    if kinds:
        # Outside the panels (constrained layout makes room): inside, it covered the bars.
        handles, labels = ax_n.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(kinds), 6), fontsize="small")
    return fig
