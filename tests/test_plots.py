"""The plots, drawn from what real engines recorded."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Rectangle

from mpbook.engine.state import telemetry_snapshot
from mpbook.plots import bubble_fraction, gpipe_bubble, plot_collectives, plot_memory, plot_throughput, plot_timeline

MICROBATCHES = 4


def _pipeline(state, m):
    """A two-stage pipeline, GPipe order: stage 0 computes micro-batch i and sends it on;
    stage 1 receives it and computes. Each step is recorded with telemetry.event."""
    import time

    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    w = torch.randn(256, 256)
    stage = state.rank
    with state.telemetry.run() as stats:
        for mb in range(m):
            x = torch.randn(64, 256) if stage == 0 else torch.empty(64, 256)
            if stage == 1:
                with state.telemetry.timed_collective("recv"):
                    dist.recv(x, src=0)
            began = time.perf_counter()
            for _ in range(40):  # enough work that a bar is wider than the dispatch skew
                x = torch.tanh(x @ w)
            state.telemetry.event(stage, mb, "prefill", began, time.perf_counter())
            if stage == 0:
                with state.telemetry.timed_collective("send"):
                    dist.send(x, dst=1)
    return stats.events


@pytest.fixture(scope="module")
def pipeline_run(workbench):
    """The engines' snapshots before the pipeline (running totals of earlier calls), and its events."""
    before = workbench.client[workbench.engine_ids()].apply_sync(telemetry_snapshot)
    per_rank = workbench.apply(_pipeline, MICROBATCHES, stream=False)
    return before, [e for rank_events in per_rank for e in rank_events]


@pytest.fixture(scope="module")
def events(pipeline_run):
    return pipeline_run[1]


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _bars_at(bars, y):
    return [b for b in bars if b.get_y() == y]


def test_timeline_has_a_bar_per_microbatch_and_stage_and_shows_the_bubble(events):
    fig = plot_timeline(events)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == MICROBATCHES * 2
    # bars of one stage never overlap, and they sit on that stage's row
    for stage in (0, 1):
        row = sorted((b for b in bars if abs(b.get_y() + b.get_height() / 2 - stage) < 1e-9), key=lambda b: b.get_x())
        assert len(row) == MICROBATCHES
        for a, b in zip(row, row[1:]):
            assert a.get_x() + a.get_width() <= b.get_x() + 1e-9
    # one clock for both ranks: stage 1 works on a micro-batch only after stage 0 sent it
    rows = {round(b.get_y() + b.get_height() / 2): sorted(_bars_at(bars, b.get_y()), key=lambda r: r.get_x()) for b in bars}
    for first, second in zip(rows[0], rows[1]):
        assert second.get_x() >= first.get_x() + first.get_width() - 1.0  # ms; 1 ms for clock reading jitter
    title = ax.get_title()
    # the title names what is drawn: these events are all prefill steps
    assert title.startswith("pipeline timeline, prefill: p=2 stages, m=4 micro-batches\n"), title
    assert "in theory: prefill 20% (GPipe, (p-1)/(m+p-1))" in title and "decode" not in title
    measured = bubble_fraction(events)
    assert f"bubble measured: prefill {measured:.0%}" in title
    # Stage 1 idles at least while stage 0 runs the first micro-batch, and stage 0 at least
    # while stage 1 runs the last (1 ms of clock jitter each): a lower bound read off the bars,
    # whatever the machine's load (which has no upper bound).
    span = max(b.get_x() + b.get_width() for b in bars) - min(b.get_x() for b in bars)
    least_idle = rows[0][0].get_width() + rows[1][-1].get_width() - 2.0
    assert measured >= least_idle / (2 * span) > 0, (measured, least_idle, span)


def test_bubble_arithmetic():
    from mpbook.parallel.pipeline import decode_bubble, interleaved_bubble

    assert gpipe_bubble(4, 8) == pytest.approx(3 / 11)
    # one decode step is one GPipe pass; over many steps the fill and drain are paid once
    assert interleaved_bubble(4, 8, 1) == pytest.approx(gpipe_bubble(4, 8))
    assert interleaved_bubble(2, 2, 31) == pytest.approx(1 / 63)
    # fewer micro-batches than stages: each stage waits for tokens to come round
    assert interleaved_bubble(4, 2, 1000) == pytest.approx(decode_bubble(4, 2), abs=1e-3) == pytest.approx(0.5, abs=1e-3)
    assert gpipe_bubble(1, 5) == 0


def test_memory_from_engine_snapshots_stacks_the_known_parts(workbench):
    def load(state):
        import torch

        layer = torch.nn.Linear(1024, 1024)
        state.cache["layer"] = layer
        state.telemetry.note_memory("weights", sum(p.numel() * p.element_size() for p in layer.parameters()))
        state.telemetry.note_memory("kv_cache", 2 * 2**20)

    workbench.apply(load, stream=False)
    snapshots = workbench.client[workbench.engine_ids()].apply_sync(telemetry_snapshot)
    fig = plot_memory(snapshots)
    ax = fig.axes[0]
    # weights, KV cache and the rest of the process ("other") for each of the two ranks
    assert len(_bars(ax)) == 3 * 2
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["kv cache", "other", "peak", "weights"]
    tops = {round(b.get_x() + b.get_width() / 2): 0.0 for b in _bars(ax)}
    for b in _bars(ax):
        tops[round(b.get_x() + b.get_width() / 2)] = max(tops[round(b.get_x() + b.get_width() / 2)], b.get_y() + b.get_height())
    unit = {"GiB": 2**30, "MiB": 2**20}[ax.get_ylabel()]  # the unit follows the largest bar
    for snap in snapshots:
        assert tops[snap["rank"]] == pytest.approx(snap["memory_in_use_bytes"] / unit)

    # one panel per layout of a comparison: drawn into the Axes given, titled as asked
    from mpbook.plots import PlotFigure

    panels = PlotFigure().subplots(1, 2)
    assert plot_memory(snapshots, ax=panels[1], title="tensor (tp2)") is panels[1].figure
    assert panels[1].get_title() == "tensor (tp2)" and len(_bars(panels[1])) == 3 * 2 and not _bars(panels[0])
    # a small model's weights in KiB, not a sliver of a GiB
    fig = plot_memory({0: {"weights": 300 * 1024, "kv_cache": 100 * 1024}, 1: {"weights": 200 * 1024}})
    assert fig.axes[0].get_ylabel() == "KiB"
    assert max(b.get_y() + b.get_height() for b in _bars(fig.axes[0])) == pytest.approx(400)
    fig = plot_memory({0: {"weights": 3 * 2**20}}, unit="KiB")  # panels that share an axis share a unit
    assert fig.axes[0].get_ylabel() == "KiB" and _bars(fig.axes[0])[0].get_height() == pytest.approx(3072)
    with pytest.raises(ValueError, match="unit='kB'; use one of GiB, MiB, KiB, bytes"):
        plot_memory({0: {"weights": 1}}, unit="kB")


def test_throughput_per_layout():
    records = [
        dict(strategy="data", dp=2, pp=1, tp=1, prefill_tokens_per_s=5000.0, decode_tokens_per_s=80.0),
        dict(strategy="pipeline", dp=1, pp=2, tp=1, prefill_tokens_per_s=3000.0, decode_tokens_per_s=30.0),
        dict(strategy="tensor", dp=1, pp=1, tp=2, prefill_tokens_per_s=4000.0, decode_tokens_per_s=55.5),
    ]
    fig = plot_throughput(records)
    prefill, decode = fig.axes
    assert [b.get_width() for b in _bars(prefill)] == [5000.0, 3000.0, 4000.0]
    assert [b.get_width() for b in _bars(decode)] == [80.0, 30.0, 55.5]
    assert [t.get_text() for t in prefill.get_yticklabels()] == ["data (dp2)", "pipeline (pp2)", "tensor (tp2)"]


def test_collectives_from_engine_snapshots(workbench, pipeline_run):
    before, _ = pipeline_run
    snapshots = workbench.client[workbench.engine_ids()].apply_sync(telemetry_snapshot)
    # the pipeline's sends (rank 0) and receives (rank 1), on top of what the engines did before
    grew = [{k: n - b["collectives"].get(k, 0) for k, n in s["collectives"].items()} for b, s in zip(before, snapshots)]
    assert grew[0].get("send") == MICROBATCHES and grew[1].get("recv") == MICROBATCHES
    fig = plot_collectives(snapshots)
    counts, seconds = fig.axes
    # one bar per rank and kind, stacked, each as high as that count
    heights = sorted((round(b.get_x() + b.get_width() / 2), round(b.get_height())) for b in _bars(counts) if b.get_height())
    assert heights == sorted((s["rank"], n) for s in snapshots for n in s["collectives"].values() if n)
    # each rank's stacked bar is as high as its seconds in collectives
    per_rank: dict[int, float] = {}
    for b in _bars(seconds):
        rank = round(b.get_x() + b.get_width() / 2)
        per_rank[rank] = per_rank.get(rank, 0.0) + b.get_height()
    assert per_rank == pytest.approx({s["rank"]: s["collective_seconds"] for s in snapshots})


def test_figures_leave_pyplot_alone_show_in_a_notebook_and_empty_input_is_a_clear_error(events):
    from IPython.core.interactiveshell import InteractiveShell

    before = plt.get_fignums()
    fig = plot_timeline(events)
    plot_memory({0: {"weights": 2**30, "total": 2**31}})
    assert plt.get_fignums() == before
    # what IPython sends to a notebook for a figure that is a cell's value: a PNG
    shown, _ = InteractiveShell.instance().display_formatter.format(fig)
    assert shown["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    for fn, arg, word in (
        (plot_timeline, [], "no events"),
        (plot_memory, {}, "no ranks"),
        (plot_throughput, [], "no records"),
        (plot_collectives, {}, "no ranks"),
    ):
        with pytest.raises(ValueError, match=word):
            fn(arg)


# --------------------------------------------------------------------------- drawn from a result
@pytest.fixture(scope="module")
def pipeline_result(workbench, tiny_folder):
    """A real pipeline generation: 2 stages, 2 micro-batches, 119 decode steps after the
    prefill, so hundreds of bars (4 prompts each run to the cap)."""
    prompts = ["Explain pipeline parallelism.", "What does an all-reduce do?", "The KV cache holds", "Hi"]
    return workbench.generate(prompts, strategy="pipeline", model=tiny_folder, microbatches=2, max_new_tokens=120,
                              ignore_eos=True)


def _drawn(fig):
    """``fig`` laid out and drawn (Agg), and its renderer: what a notebook's PNG shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def test_every_plot_takes_a_result(pipeline_result):
    result = pipeline_result
    # the timeline: by default every step of the run, the prefill and each decode step
    ax = plot_timeline(result).axes[0]
    assert len(_bars(ax)) == len(result.timeline) == 2 * 2 + 2 * 2 * 119
    assert ax.get_title().startswith("pipeline timeline, prefill and 119 decode steps: p=2 stages, m=2 micro-batches")
    for phase, bars, named in (("prefill", 2 * 2, "prefill"), ("decode", 2 * 2 * 119, "119 decode steps")):
        for fig in (plot_timeline(result, phase), result.plot_timeline(phase)):
            assert len(_bars(fig.axes[0])) == bars
            assert fig.axes[0].get_title().startswith(f"pipeline timeline, {named}: p=2 stages"), phase
    assert len(_bars(result.plot_timeline().axes[0])) == len(result.timeline)
    with pytest.raises(ValueError, match="phase='bogus'; use one of prefill, decode"):
        plot_timeline(result, "bogus")
    # memory: weights and KV cache per rank, and the run's peak as the tick
    ax = plot_memory(result).axes[0]
    unit = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[ax.get_ylabel()]
    peaks = ax.collections[0].get_offsets()
    assert [round(y * unit) for _, y in peaks] == pytest.approx(result.peak_memory_bytes, rel=1e-9)
    # collectives: each rank's counts stacked, its seconds beside them
    counts, seconds = plot_collectives(result).axes
    heights = sorted((round(b.get_x() + b.get_width() / 2), round(b.get_height())) for b in _bars(counts) if b.get_height())
    assert heights == sorted((r, n) for r, c in enumerate(result.collectives) for n in c.values() if n)
    assert [b.get_height() for b in _bars(seconds)] == pytest.approx(result.collective_seconds)
    # throughput: one result, or results and records mixed
    prefill, decode = plot_throughput(result).axes
    assert [b.get_width() for b in _bars(prefill)] == [result.prefill_tokens_per_s]
    assert [b.get_width() for b in _bars(decode)] == [result.decode_tokens_per_s]
    assert len(_bars(plot_throughput([result, result.record()]).axes[0])) == 2


def test_the_timeline_labels_only_the_bars_its_numbers_fit_in(pipeline_result):
    for phase in (None, "prefill"):
        fig = plot_timeline(pipeline_result, phase)
        renderer = _drawn(fig)
        ax = fig.axes[0]
        bars = _bars(ax)
        labels = [t for t in ax.texts if t.get_text().isdigit()]
        if phase == "prefill":  # four wide bars: each carries its micro-batch's number
            assert sorted(t.get_text() for t in labels) == ["0", "0", "1", "1"]
        else:  # hundreds of thin decode bars: few numbers, if any
            assert len(labels) < len(bars) / 4, (len(labels), len(bars))
        for label in labels:
            x, y = label.get_position()
            bar = next(b for b in bars
                       if b.get_x() <= x <= b.get_x() + b.get_width() and b.get_y() <= y <= b.get_y() + b.get_height())
            text, box = label.get_window_extent(renderer), bar.get_window_extent(renderer)
            assert box.x0 <= text.x0 and text.x1 <= box.x1, (label.get_text(), text, box)


def test_the_collectives_legend_covers_no_bar(pipeline_result):
    fig = plot_collectives(pipeline_result)
    renderer = _drawn(fig)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    legend = legends[0].get_window_extent(renderer)
    kinds = {k for c in pipeline_result.collectives for k in c}
    assert sorted(t.get_text() for t in legends[0].get_texts()) == sorted(kinds)
    for ax in fig.axes:
        for bar in _bars(ax):
            if bar.get_height():
                assert not legend.overlaps(bar.get_window_extent(renderer)), (ax.get_title(), bar)
