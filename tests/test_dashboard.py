"""The live dashboard.

First its figures without engines (fast): snapshots written here are fed to
``Dashboard.update`` as the engines would publish them, to check what the views show: per-call
totals, loading as a phase, the result's numbers, the throughput plot's label, memory against
capacity, each prompt's text growing. Then on real engines (``cluster``): widget values while a
cell runs, the end state, the text fallback (IPython terminal shell, a script), a real kernel.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
from IPython.core.error import UsageError

import mpbook.dashboard.text_view
from mpbook import RankError
from mpbook.compat import ipywidgets as widgets_compat
from mpbook.dashboard import Dashboard, Follower, follow
from mpbook.dashboard.snapshots import MemoryFigure, format_step, memory_of
from mpbook.dashboard.text_view import TextView
from mpbook.dashboard.texts import PromptText, PromptTexts, call_stream
from mpbook.dashboard.view import View
from mpbook.dashboard.widget import WidgetView, memory_bar_html
from mpbook.dashboard.words import duration
from mpbook.errors import RankFailure
from mpbook.layout import Layout
from mpbook.results import RunResult

MiB, GiB = 2**20, 2**30


class Clock:
    """The client's clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def snapshot(t: float, *, rank: int = 0, phase: str = "decode", tokens=None, phase_seconds=None,
             collective_seconds: float = 0.0, replica=None, memory=None, parts=None, stream=None,
             expert_tokens: int = 0) -> dict:
    """A telemetry snapshot as an engine publishes it: running totals since the engine started."""
    snap = {
        "rank": rank, "host": "h", "device": "cpu", "phase": phase, "time": t,
        "tokens": dict(tokens or {}), "phase_seconds": dict(phase_seconds or {}),
        "collectives": {}, "collective_seconds": collective_seconds, "collective_seconds_by_kind": {},
        "memory": memory or {"in_use": 384 * MiB, "peak": 400 * MiB, "reserved": None,
                             "device_used": 8 * GiB, "device_total": 64 * GiB},
        "memory_parts": dict(parts or {}), "replica": rank if replica is None else replica,
        "expert_tokens": expert_tokens,
    }
    if stream is not None:
        snap["stream"] = stream
    return snap


def fed(dash: Dashboard, clock: Clock, frames: list[tuple[float, dict, dict]]) -> None:
    """Feed ``(client seconds later, {rank: latest}, {rank: start})`` and refresh after each."""
    for later, latest, starts in frames:
        clock.t += later
        dash.update(latest, starts)
        dash.refresh(force=True)


def a_result(**changes) -> RunResult:
    """A RunResult as the session merges it: 2 prompts of 12 tokens, 16 new tokens each on pp=2."""
    fields = dict(
        strategy="pipeline", model="tiny", layout=Layout(pp=2), dtype="float32", microbatches=1,
        max_new_tokens=16, prompts=["a b", "c d"], prompt_tokens=[12, 12], token_ids=[[1] * 16, [2] * 16],
        texts=["the final text", "another one"], logits=None, prefill_seconds=0.012, decode_seconds=0.6,
        peak_memory_bytes=[400 * MiB, 400 * MiB], weight_bytes=[400_000, 400_000], kv_cache_bytes=[8192, 8192],
        collectives=[{"send": 16}, {"recv": 16}], collective_seconds=[0.21, 0.34], timeline=[],
        load_seconds=[9.8, 9.7],
    )
    fields.update(changes)
    return RunResult(**fields)


# --------------------------------------------------------------------------- figures, no engines
def test_collective_time_is_the_calls_own_not_the_engines_total():
    clock = Clock()
    dash = Dashboard(ranks=[0], mode="widget", clock=clock)
    # The engine has spent 25 s in collectives in earlier cells; this call adds 0.5 s.
    before = snapshot(1000.0, phase="idle", tokens={"decode": 900}, collective_seconds=25.0, phase_seconds={"decode": 60.0})
    dash.begin()
    fed(dash, clock, [
        (0.25, {0: snapshot(1000.5, tokens={"decode": 910}, collective_seconds=25.2, phase_seconds={"decode": 60.5})}, {0: before}),
        (0.25, {0: snapshot(1001.0, tokens={"decode": 920}, collective_seconds=25.5, phase_seconds={"decode": 61.0})}, {0: before}),
    ])
    assert dash.view.values()[0]["collectives"].startswith("0.50 s")
    dash.finish()
    assert dash.view.values()[0]["collectives"] == "0.50 s"
    assert "decode 20 tokens, 20.0 tok/s" in dash.headline and "collectives up to 0.50 s a rank" in dash.headline

    # The next call starts from zero again, even before its first snapshot.
    dash.begin()
    assert dash.view.values()[0]["collectives"] == "0.00 s"
    later = snapshot(1010.0, phase="idle", tokens={"decode": 920}, collective_seconds=25.5, phase_seconds={"decode": 61.0})
    fed(dash, clock, [(0.25, {0: snapshot(1010.2, tokens={"decode": 922}, collective_seconds=25.6, phase_seconds={"decode": 61.2})}, {0: later})])
    dash.finish()
    assert dash.view.values()[0]["collectives"] == "0.10 s"
    assert "decode 2 tokens" in dash.headline


def test_a_replica_counts_its_tokens_once_and_replicas_add_up():
    clock = Clock()
    dash = Dashboard(ranks=[0, 1, 2, 3], mode="widget", clock=clock)
    dash.begin()
    start = {r: snapshot(0.0, rank=r, phase="idle", replica=r // 2) for r in range(4)}
    # dp=2 x pp=2: ranks 0, 1 are replica 0; ranks 2, 3 replica 1. Every stage counts the
    # replica's tokens; the phase's time is the longest rank's (1.0 s of decode on rank 3).
    latest = {
        r: snapshot(2.0, rank=r, replica=r // 2, tokens={"prefill": 24, "decode": 30},
                    phase_seconds={"prefill": 0.1, "decode": 0.8 if r != 3 else 1.0})
        for r in range(4)
    }
    fed(dash, clock, [(0.5, latest, start)])
    dash.finish()
    assert "prefill 48 tokens, 480 tok/s" in dash.headline
    assert "decode 60 tokens, 60.0 tok/s" in dash.headline
    # each row shows its replica's decode tokens/s over the call
    rates = {r: v["tokens/s"] for r, v in dash.view.values().items()}
    assert rates == {0: "37.5", 1: "37.5", 2: "30.0", 3: "30.0"}


def test_loading_is_a_phase_of_its_own_and_counts_in_the_calls_time():
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="widget", clock=clock)
    dash.begin()
    start = {r: snapshot(0.0, rank=r, phase="idle", replica=0) for r in (0, 1)}
    fed(dash, clock, [(1.0, {r: snapshot(1.0, rank=r, phase="loading", replica=0, phase_seconds={"loading": 1.0}) for r in (0, 1)}, start)])
    assert dash.view.values()[0]["phase"] == "loading"
    assert "running · 1.0 s · loading" in dash.view.status.value
    done = {r: snapshot(11.0, rank=r, phase="idle", replica=0, tokens={"prefill": 24, "decode": 30},
                        phase_seconds={"loading": 9.8, "prefill": 0.2, "decode": 1.0}) for r in (0, 1)}
    fed(dash, clock, [(10.0, done, start)])
    dash.finish()
    # the call took 11 s on the client's clock, 9.8 of them loading the model
    assert dash.headline.startswith("done in 11.0 s · loading 9.8 s · prefill 24 tokens")


def test_the_end_state_carries_the_results_numbers():
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="text", out=io.StringIO(), clock=clock)
    follower = Follower([dash])
    follower.describe_run(SimpleNamespace(prompts=["a b", "c d"], decode=lambda ids: " ".join(map(str, ids))))
    result = a_result()
    fake = SimpleNamespace(metadata=[{}, {}])  # what the wait loop's AsyncResult offers: no data yet
    with follower(fake, [0, 1]) as tick:
        clock.t += 10.6
        start = {r: snapshot(0.0, rank=r, phase="idle", replica=0) for r in (0, 1)}
        dash.update({r: snapshot(10.6, rank=r, replica=0, tokens={"prefill": 24, "decode": 30},
                                 phase_seconds={"loading": 9.8, "prefill": 0.012, "decode": 0.6}) for r in (0, 1)}, start)
        tick()
    assert dash.view.out.getvalue() == ""  # the summary waits for the result
    follower.show_result(result)
    out = dash.view.out.getvalue()
    # the same digits as the summary line the cell prints under the dashboard
    assert f"prefill {result.prefill_tokens_per_s:,.0f} tok/s" in result.summary()
    assert f"24 tokens, {result.prefill_tokens_per_s:,.0f} tok/s" in out
    assert f"30 tokens, {result.decode_tokens_per_s:,.1f} tok/s" in out
    assert "loading 9.8 s" in out and "collectives up to 0.34 s a rank" in out
    assert out.count("mpbook: done in 10.6 s") == 1
    # the prompts show the result's texts
    assert [p.text for p in dash.frame().prompts] == result.texts


def test_a_decode_steps_column_names_a_pipelines_drain_inside_its_wait():
    """A rank's mean step and its parts in ms; a pipeline stage's waiting in its micro-batches'
    first steps (once per run) is named inside its wait, and a rank with none shows nothing."""
    def breakdown(**seconds):
        parts = {"compute": 0, "collectives": 0, "waiting": 0, "token choice": 0, "host": 0, "waiting at start": 0}
        return {**parts, **seconds, "steps": sum(v for k, v in seconds.items() if k != "waiting at start"),
                "count": 100.0}

    tensor = breakdown(compute=0.800, collectives=0.130, **{"token choice": 0.010, "host": 0.020})
    assert format_step(tensor) == "9.60 ms: compute 8.00 · coll 1.30 · wait 0 · choice 0.10 · host 0.20"
    stage0 = breakdown(compute=0.434, collectives=0.003, waiting=0.110, host=0.016, **{"waiting at start": 0.037})
    assert format_step(stage0) == "5.63 ms: compute 4.34 · coll 0.03 · wait 1.10 (0.37 at start) · choice 0 · host 0.16"
    assert format_step({**stage0, "waiting at start": 0.0}).count("at start") == 0
    assert format_step(None) == format_step({"count": 0}) != "" and "ms" not in format_step(None)


def test_a_failed_or_interrupted_call_says_so_without_waiting_for_a_result():
    dash = Dashboard(ranks=[0, 1], mode="widget", clock=Clock())
    dash.begin(run=SimpleNamespace(prompts=["x"], decode=None))
    dash.finish(RankError([RankFailure(1, "ValueError", "bad shard", [])]))
    assert "✗" in dash.view.status.value and "failed on rank 1 after" in dash.headline and "ValueError: bad shard" in dash.headline
    assert dash.view.values()[1]["phase"] == "failed"
    dash.begin()
    dash.finish(KeyboardInterrupt())
    assert dash.headline.startswith("interrupted after") and "■" in dash.view.status.value


def test_the_plot_label_never_invents_a_maximum():
    clock = Clock()
    dash = Dashboard(ranks=[0], mode="widget", clock=clock)
    dash.begin()
    start = {0: snapshot(0.0, phase="idle")}
    # a short run: two snapshots, so few points of the live rate
    fed(dash, clock, [
        (0.25, {0: snapshot(0.25, phase="prefill", tokens={"prefill": 8}, phase_seconds={"prefill": 0.25})}, start),
        (0.25, {0: snapshot(0.5, tokens={"prefill": 8, "decode": 4}, phase_seconds={"prefill": 0.25, "decode": 0.25})}, start),
    ])
    label = dash.frame().rate_label
    assert "max" not in label and "1.0" not in label, label
    assert label == "tokens/s so far this cell: prefill 32 tok/s · decode 16.0 tok/s"
    dash.finish()
    assert dash.frame().rate_label == "this cell: prefill 32 tok/s · decode 16.0 tok/s"

    # a longer run: the live rate has points enough, and the maximum is a real one
    dash.begin()
    start = {0: snapshot(10.0, phase="idle")}
    for i in range(1, 9):
        fed(dash, clock, [(0.25, {0: snapshot(10.0 + 0.25 * i, tokens={"decode": 5 * i}, phase_seconds={"decode": 0.25 * i})}, start)])
    label = dash.frame().rate_label
    assert label.startswith("tokens/s: 20.0 now · 20.0 max"), label
    assert "<polyline" in dash.view.plot.value

    # nothing generated: no line, no numbers
    dash.begin()
    fed(dash, clock, [(0.25, {0: snapshot(20.0, phase="idle")}, {0: snapshot(19.9, phase="idle")})])
    assert dash.frame().rate_label == "tokens/s: no tokens yet"
    assert "<polyline" not in dash.view.plot.value


def test_memory_is_a_bar_against_the_devices_capacity_with_the_tensors_beside_it():
    # A CPU engine of a 0.2 M-parameter model: the process holds 384 MiB, the model's tensors 800 KiB.
    snap = snapshot(1.0, parts={"weights": 800 * 1024, "kv_cache": 16 * 1024})
    memory = memory_of(snap)
    assert memory.label() == "384.0 MiB / 64.0 GiB"
    assert memory.share == pytest.approx(384 / (64 * 1024))
    assert memory.tensors_label() == "weights 800.0 KiB · KV 16.0 KiB"
    bar = memory_bar_html(memory.label(), memory.share)
    assert "width:1%" in bar and "384.0 MiB / 64.0 GiB" in bar
    assert "width:50%" in memory_bar_html("x", 0.5) and "#d62728" in memory_bar_html("x", 0.95)
    # without a capacity: the figure alone, no bar
    assert MemoryFigure(in_use=5 * MiB).label() == "5.0 MiB" and MemoryFigure(in_use=5).share is None
    assert "width" not in memory_bar_html("5.0 MiB", None)

    dash = Dashboard(ranks=[0], mode="widget", clock=Clock())
    dash.begin()
    dash.update({0: snap})
    dash.refresh(force=True)
    row = dash.view.values()[0]
    assert (row["memory"], row["tensors"], row["peak"]) == ("384.0 MiB / 64.0 GiB", "weights 800.0 KiB · KV 16.0 KiB", "400.0 MiB")
    assert "width:1%" in dash.view.cells[0]["memory"].value


def test_cpu_engines_report_the_hosts_memory_as_their_capacity():
    import psutil
    import torch

    from mpbook.engine.telemetry import Telemetry

    memory = Telemetry(0, torch.device("cpu")).memory()
    assert memory["device_total"] == psutil.virtual_memory().total
    assert 0 < memory["in_use"] < memory["device_total"]


def stream(run: int, rows: dict[int, list[int]]) -> dict:
    return {"run": run, "rows": rows, "times": {i: [0.1 * (k + 1) for k in range(len(ids))] for i, ids in rows.items()}}


def words_of(ids) -> str:
    return "".join(f" w{i}" for i in ids)


def test_each_prompts_text_grows_while_a_generation_runs():
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="widget", clock=clock)
    # The previous run's stream is still in the snapshots as this call begins: not shown.
    start = {0: snapshot(0.0, phase="idle", replica=0, stream=stream(7, {0: [9, 9, 9]})), 1: snapshot(0.0, rank=1, phase="idle", replica=1)}
    dash.begin(run=SimpleNamespace(prompts=["first prompt", "second <b>prompt</b>"], decode=words_of))
    fed(dash, clock, [(0.25, {0: snapshot(0.25, phase="loading", replica=0, stream=stream(7, {0: [9, 9, 9]}))}, start)])
    assert [p.text for p in dash.frame().prompts] == ["", ""]
    seen = []
    # dp=2: each replica's token-choosing rank streams its own prompt
    for n in range(1, 5):
        latest = {
            0: snapshot(0.25 + n * 0.25, replica=0, stream=stream(8, {0: list(range(n))})),
            1: snapshot(0.25 + n * 0.25, rank=1, replica=1, stream=stream(8, {1: list(range(10, 10 + n))})),
        }
        fed(dash, clock, [(0.25, latest, start)])
        seen.append(dash.view.prompt_values())
    assert [p.text for p in dash.frame().prompts] == [" w0 w1 w2 w3", " w10 w11 w12 w13"]
    lengths = [len(v[0]) for v in seen]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4  # it grew at every refresh
    assert "4 tokens · first after 0.10 s" in seen[-1][0]
    assert "second &lt;b&gt;prompt&lt;/b&gt;" in seen[-1][1]  # prompts and texts are escaped
    lines = dash.view.prompt_lines
    assert [sorted(widgets_compat.css_classes(line)) for line in lines] == [["mpbook-prompt", "mpbook-prompt-0"], ["mpbook-prompt", "mpbook-prompt-1"]]
    dash.finish()
    dash.show_result(a_result(texts=["final 0", "final 1"]))
    assert 'class="mpbook-generated">final 0<' in dash.view.prompt_values()[0]
    # a call without prompts (a %%mp run cell) shows no prompt lines
    dash.begin()
    assert dash.view.prompts.children == ()


def test_once_merged_every_figure_is_the_results():
    """The snapshots were last read a moment before the run ended (4 of prompt 0's tokens,
    none of prompt 1's): once the result is merged, each prompt's token count and first
    token, each rank's tokens/s, collectives, peak and expert load are the result's."""
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="widget", clock=clock)
    dash.begin(run=SimpleNamespace(prompts=["a b", "c d"], decode=words_of))
    start = {r: snapshot(0.0, rank=r, phase="idle", expert_tokens=1000) for r in (0, 1)}
    latest = {
        0: snapshot(0.5, tokens={"prefill": 12, "decode": 3}, phase_seconds={"prefill": 0.01, "decode": 0.3},
                    collective_seconds=0.05, expert_tokens=1100, stream=stream(3, {0: [1, 1, 1, 1]})),
        1: snapshot(0.5, rank=1, tokens={"prefill": 12}, phase_seconds={"prefill": 0.01}, expert_tokens=1040),
    }
    fed(dash, clock, [(0.5, latest, start)])
    dash.finish()
    values = dash.view.values()
    assert [values[r]["expert load"] for r in (0, 1)] == ["100", "40"]  # the call's own routes, from the snapshots
    assert "(4 tokens" in dash.view.prompt_values()[0]
    result = a_result(
        strategy="data", layout=Layout(dp=2), token_ids=[[1] * 16, [2] * 9], stop_reasons=["length", "eos"],
        token_times=[[0.1 * (k + 1) for k in range(16)], [0.2 + 0.1 * k for k in range(9)]],
        rank_rows=[[0], [1]], rank_phase_seconds=[{"prefill": 0.01, "decode": 0.5}, {"prefill": 0.012, "decode": 0.4}],
        peak_memory_bytes=[500 * MiB, 510 * MiB], collective_seconds=[0.0, 0.0], expert_tokens=[120, 80],
    )
    dash.show_result(result)
    assert [p.note() for p in dash.frame().prompts] == ["16 tokens · first after 0.10 s", "9 tokens · first after 0.20 s"]
    assert "(16 tokens · first after 0.10 s)" in dash.view.prompt_values()[0]
    assert "(9 tokens" in dash.view.prompt_values()[1]
    # each replica's decode: 15 tokens after the first in 0.5 s, 8 in 0.4 s
    assert result.tokens_per_s_by_rank("decode") == [30.0, 20.0]
    values = dash.view.values()
    assert [values[r]["tokens/s"] for r in (0, 1)] == ["30.0", "20.0"]
    assert [values[r]["collectives"] for r in (0, 1)] == ["0.00 s", "0.00 s"]
    assert [values[r]["peak"] for r in (0, 1)] == ["500.0 MiB", "510.0 MiB"]
    assert [values[r]["expert load"] for r in (0, 1)] == ["120", "80"]


def test_a_cell_without_tokens_shows_its_own_time_and_no_token_plot():
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="widget", clock=clock)
    for _ in range(2):  # a quick `%%mp run` cell: 35 ms, no tokens
        dash.begin()
        start = {r: snapshot(clock.t, rank=r, phase="idle") for r in (0, 1)}
        fed(dash, clock, [(0.035, {r: snapshot(clock.t + 0.03, rank=r, phase="idle") for r in (0, 1)}, start)])
        assert dash.view.plot.layout.display == "none" and dash.view.plot.value == ""
        dash.finish()
        assert dash.headline == "done in 35 ms"
        assert "✓" in dash.view.status.value and "done in 35 ms" in dash.view.status.value
        assert dash.view.plot.layout.display == "none" and dash.view.plot.value == ""
        # a cell that counts tokens has its plot back
        dash.begin()
        start = {r: snapshot(clock.t, rank=r, phase="idle") for r in (0, 1)}
        fed(dash, clock, [(1.25, {r: snapshot(clock.t + 1.25, rank=r, tokens={"decode": 10},
                                              phase_seconds={"decode": 1.0}) for r in (0, 1)}, start)])
        dash.finish()
        assert dash.headline.startswith("done in 1.2 s · decode 20 tokens, 20.0 tok/s"), dash.headline
        assert dash.view.plot.layout.display is None and "this cell: decode 20.0 tok/s" in dash.view.plot.value
    # a generation shows its plot from the start, before any token
    dash.begin(run=SimpleNamespace(prompts=["x"], decode=None))
    assert dash.view.plot.layout.display is None and "no tokens yet" in dash.view.plot.value


def test_stream_figures_of_an_earlier_run_are_not_this_calls():
    assert call_stream({"stream": {"run": 1}}, {"stream": {"run": 1, "rows": {0: [5]}}}) is None
    assert call_stream({"stream": {"run": 1}}, {"stream": {"run": 2, "rows": {0: [5]}}})["run"] == 2
    assert call_stream(None, {"stream": {"run": 1, "rows": {}}}) is not None
    assert call_stream({}, {}) is None
    texts = PromptTexts(["p"], decode=words_of)
    assert texts.take({"rows": {"0": [1, 2]}, "times": {"0": [0.5, 0.6]}})  # keys as strings too
    assert not texts.take({"rows": {0: [1]}})  # older (shorter) news changes nothing
    assert texts.lines()[0].text == " w1 w2" and texts.updates == 1
    # a random model's tokens decode to any byte: control characters are left out of the page
    from mpbook.dashboard.widget import prompt_html

    assert 'class="mpbook-generated">ab\nc<' in prompt_html(PromptText(0, "p\x1b", text="a\x00b\nc"))


def test_the_text_view_prints_new_text_twice_a_second_and_one_summary():
    clock = Clock()
    out = io.StringIO()
    dash = Dashboard(ranks=[0], mode="text", out=out, clock=clock, text_every_s=3600)
    dash.view.stream_every_s = 0.0  # every refresh: the pace itself is the view's clock's business
    dash.begin(run=SimpleNamespace(prompts=["p"], decode=lambda ids: "".join(f"w{i}\n" if i == 2 else f"w{i} " for i in ids)))
    start = {0: snapshot(0.0, phase="idle")}
    for n in (1, 2, 3):
        fed(dash, clock, [(0.5, {0: snapshot(0.5 * n, tokens={"decode": n}, phase_seconds={"decode": 0.5 * n}, stream=stream(1, {0: list(range(n))}))}, start)])
    dash.finish()
    dash.show_result(a_result(texts=["w0 w1 w2\n the end"]))
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[0] w0 ", "[0] …w1 ", "[0] …w2⏎"], lines
    assert lines[3] == "[0] … the end"
    assert sum(line.startswith("mpbook: done in") for line in lines) == 1


class InterfaceOnly:
    """A view with the View interface and nothing else: anything more the dashboard asked of
    it would raise (``__slots__``: no attribute can be added or read beyond these)."""

    __slots__ = ("calls", "updates_in_place")

    def __init__(self, updates_in_place: bool):
        self.calls: list = []
        self.updates_in_place = updates_in_place

    def show(self) -> None:
        self.calls.append(("show",))

    def render(self, frame) -> None:
        self.calls.append(("render", frame))

    def finish(self, frame) -> None:
        self.calls.append(("finish", frame))


def _recording(view_class):
    """``view_class`` (a real view) recording what the dashboard asks of it, as InterfaceOnly does."""

    class Recording(view_class):
        def show(self) -> None:
            self.calls.append(("show",))

        def render(self, frame) -> None:
            self.calls.append(("render", frame))

        def finish(self, frame) -> None:
            self.calls.append(("finish", frame))

    return Recording


def _drive(view) -> list:
    """One dashboard's life with ``view``: shown, a call with two refreshes, its result, idle."""
    clock = Clock()
    dash = Dashboard(ranks=[0, 1], mode="text", clock=clock)
    dash.view = view
    dash.show()
    dash.begin(run=SimpleNamespace(prompts=["p", "q"], decode=words_of))
    start = {0: snapshot(0.0, phase="idle"), 1: snapshot(0.0, rank=1, phase="idle", replica=1)}
    for n in (1, 2):
        latest = {0: snapshot(0.5 * n, tokens={"decode": n}, stream=stream(1, {0: list(range(n))})),
                  1: snapshot(0.5 * n, rank=1, replica=1, tokens={"decode": n}, stream=stream(1, {1: list(range(n))}))}
        fed(dash, clock, [(0.5, latest, start)])
    dash.finish()
    dash.show_result(a_result(texts=["w0 w1", "w0 w1"]))
    dash.idle("between calls")
    return view.calls


@pytest.mark.parametrize("updates_in_place", [False, True])
def test_the_dashboard_uses_its_view_through_the_view_interface_alone(updates_in_place):
    """Whatever the view is, the dashboard asks it the same: a view of the interface alone
    gets the same calls with the same frames as a real view of the same kind."""
    real = (_recording(WidgetView)([0, 1], cuda=False) if updates_in_place
            else _recording(TextView)(out=io.StringIO()))
    real.calls = []
    assert real.updates_in_place is updates_in_place
    calls = _drive(InterfaceOnly(updates_in_place))
    kinds = [c[0] for c in calls]
    assert kinds[0] == "show" and kinds.count("show") == 1 and kinds.count("render") >= 3, kinds
    assert [c[1].state for c in calls if c[0] == "finish"][:1] == ["done"], kinds  # the end state reached it
    assert calls == _drive(real)
    assert set(View.__annotations__) == {"updates_in_place"}


def test_a_dashboard_that_raises_is_dropped_and_the_others_carry_on(caplog):
    good = Dashboard(ranks=[0], mode="widget", clock=Clock())
    bad = Dashboard(ranks=[0], mode="widget", clock=Clock())

    def broken(frame):
        raise RuntimeError("display gone")

    bad.view.render = broken
    published = {"telemetry_start": snapshot(0.0, phase="idle"), "telemetry": snapshot(1.0, tokens={"decode": 3})}
    fake = SimpleNamespace(metadata=[{"data": published}])  # an AsyncResult's per-target metadata
    with caplog.at_level("WARNING", logger="mpbook.dashboard"):
        with follow([bad, good], on_tick=None)(fake, [0]) as tick:
            tick()
    assert "the mpbook dashboard stopped updating" in caplog.text
    assert good.state == "done" and "decode 3 tokens" in good.headline


# Prefill for 1 s, then decode at about 20 tokens/s per rank for ~2 s: 56 tokens a rank, and each
# rank is its own replica here, so 112 for the cluster.
GENERATE_CELL = """
import time
with telemetry.phase_scope("prefill"):
    time.sleep(1.0)  # four snapshot periods, so that some refresh surely shows it
    telemetry.add_tokens("prefill", 16)
with telemetry.phase_scope("decode"):
    for _ in range(20):
        time.sleep(0.1)
        telemetry.add_tokens("decode", 2)
"""


@pytest.mark.cluster
def test_widget_values_change_while_a_cell_runs(workbench):
    dash = Dashboard(workbench, mode="widget")
    frames = []  # (seconds since start, refreshes, grid values, status) at each tick of the wait loop
    began = time.monotonic()

    def tick():
        frames.append((time.monotonic() - began, dash.refreshes, dash.view.values(), dash.view.status.value))

    workbench.run(GENERATE_CELL, dashboard=dash, on_tick=tick)
    seconds = frames[-1][0]
    # refreshed at least twice a second while the cell ran
    assert dash.refreshes >= 2 * seconds, (dash.refreshes, seconds)
    for rank in workbench.ranks:
        phases = [f[2][rank]["phase"] for f in frames]
        order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
        assert [p for p in order if p in ("prefill", "decode")] == ["prefill", "decode"], order
        decoding = [float(f[2][rank]["tokens/s"]) for f in frames if f[2][rank]["phase"] == "decode"]
        # 2 tokens every 0.1 s: about 20 tokens/s (generous: the machine is shared)
        assert decoding and 5 < max(decoding) < 80, decoding
        assert {f[2][rank]["host"] for f in frames} == {workbench.engines[rank].host}
        assert "MiB" in frames[-1][2][rank]["memory"] or "GiB" in frames[-1][2][rank]["memory"]
    statuses = {f[3] for f in frames}
    assert sum("running" in s for s in statuses) >= 3  # the elapsed time moved on
    final = dash.view.status.value
    assert "✓" in final and "done in" in final and "prefill 32 tokens" in final and "decode 80 tokens" in final
    assert dash.state == "done"
    # the plot of the cluster's tokens/s: every refresh added a point, and it rose above 0
    assert len(dash.history) >= 4 and max(dash.history) > 10
    assert "<polyline" in dash.view.plot.value
    # the final tokens/s of each rank is its decode over the cell: 40 tokens in about 2 s
    for rank in workbench.ranks:
        assert 5 < float(dash.view.values()[rank]["tokens/s"]) < 80
        # memory: the process against the host's memory, a bar in the page
        assert " / " in dash.view.values()[rank]["memory"] and "width:" in dash.view.cells[rank]["memory"].value


@pytest.mark.cluster
def test_a_generation_tells_one_story(workbench):
    """Two runs of the tiny model: the first loads it (a phase of its own, counted in the
    cell's time), the second does not; each run's figures are its own and equal the result's."""
    prompts = ["Explain pipeline parallelism in one sentence.", "What does an all-reduce do?"]
    # another layout first (an engine keeps one model), so that the first run below must load
    workbench.generate(prompts[:1], strategy="tensor", model="tiny", max_new_tokens=1)
    stories = []
    for _ in range(2):
        dash = Dashboard(workbench, mode="widget")
        phases = []
        result = workbench.generate(prompts, strategy="pipeline", model="tiny", max_new_tokens=24, ignore_eos=True,
                                    dashboard=dash, on_tick=lambda: phases.append(dash.view.values()[0]["phase"]))
        stories.append((dash, result, phases))

    (first, first_result, first_phases), (second, result, _) = stories
    second_result = result
    # The first run loaded the model (the tiny one in ~40 ms, often between two refreshes of the
    # phase column); the headline names the loading when it is long enough to read (0.05 s).
    assert max(first_result.load_seconds) > 0 and max(second_result.load_seconds) == 0
    loading = dict(first_result.cell_parts())["loading"]  # the busiest rank's, as the headline's parts are
    assert (f"loading {loading:.1f} s" in first.headline) == (loading >= 0.05), first.headline
    # the call's time is the session's, loading included
    assert f"done in {duration(first_result.cell_seconds)}" in first.headline
    assert first_result.cell_seconds >= max(first_result.load_seconds)
    assert "loading" not in second.headline  # the model was loaded already
    for dash, res in ((first, first_result), (second, result)):
        status = dash.view.status.value
        assert f"prefill {sum(res.prompt_tokens)} tokens, {res.prefill_tokens_per_s:,.0f} tok/s" in status
        assert f"decode {len(prompts) * 23} tokens, {res.decode_tokens_per_s:,.1f} tok/s" in status  # ignore_eos: 24 each
        # collectives: this run's own seconds on each rank, not the engines' running total
        for rank in workbench.ranks:
            over = "".join(f" {t}" for t in sorted(set(res.transports[rank].values())))  # what they went over
            assert dash.view.values()[rank]["collectives"] == f"{res.collective_seconds[rank]:.2f} s{over}"
        assert "this cell: prefill" in dash.view.plot.value and "max" not in dash.view.plot.value.split("</text>")[0]
        # the tensors beside the process figure: this rank's weights and KV cache
        for rank in workbench.ranks:
            assert "weights" in dash.view.values()[rank]["tensors"]


@pytest.mark.cluster
def test_each_prompts_text_grows_live_during_a_generation(workbench):
    import html
    import re

    dash = Dashboard(workbench, mode="widget")
    # (seconds, prompt 0's text so far, what its line in the page shows) at each tick
    seen: list[tuple[float, str, str]] = []

    def tick():
        if dash.state == "running" and dash.view.prompt_lines:
            shown = re.search(r'class="mpbook-generated">(.*?)</span>', dash.view.prompt_values()[0], re.S)
            seen.append((time.monotonic(), dash.frame().prompts[0].text, html.unescape(shown.group(1))))

    result = workbench.generate(["The KV cache holds", "Data parallel replicas"], strategy="pipeline", model="tiny",
                                max_new_tokens=400, ignore_eos=True, dashboard=dash, on_tick=tick)
    texts = [(t, v) for t, v, _ in seen if v]
    changes = [(t, v) for i, (t, v) in enumerate(texts) if i == 0 or v != texts[i - 1][1]]
    assert len(changes) >= 3, changes
    assert all(b.startswith(a) and len(a) < len(b) for (_, a), (_, b) in zip(changes, changes[1:]))  # it grew
    # the page shows the text as of its last refresh (four a second), its end when it is long
    assert all(page.lstrip("…") in text for _, text, page in seen)
    assert any(page.startswith("…") for _, _, page in seen)
    # about four updates a second while tokens came (at least two: the machine is shared)
    span = changes[-1][0] - changes[0][0]
    assert len(changes) - 1 >= 2 * span - 1, (len(changes), span)
    # the end state shows the result's text
    assert html.escape(result.texts[0][-20:]) in dash.view.prompt_values()[0]


LATE = 400  # prompt 1's tokens: long enough that replica 1 runs on well after replica 0 stopped


@pytest.fixture(scope="module")
def early_and_late(workbench, tiny_folder):
    """Two prompts for two data-parallel replicas, and a stop string that ends prompt 0
    within a few tokens while prompt 1 runs to the cap: replica 0 finishes long before
    replica 1. The stop string is a word prompt 0 says (greedy) that prompt 1 never does."""
    from mpbook.models import load_tokenizer

    prompts = ["Explain pipeline parallelism in one sentence.", "What does an all-reduce do?"]
    free = workbench.generate(prompts, strategy="data", model=tiny_folder, max_new_tokens=LATE, ignore_eos=True)
    tok = load_tokenizer(tiny_folder)
    for i in range(2, 12):
        word = tok.convert_ids_to_tokens(free.token_ids[0][i])
        if word.isalpha() and len(word) >= 4 and word not in tok.decode(free.token_ids[0][:i]) and word not in free.texts[1]:
            return prompts, word, i + 1
    pytest.fail(f"no stop word in the first tokens of {free.texts[0]!r}")


@pytest.mark.cluster
def test_every_prompt_shows_its_last_tokens_and_a_replica_that_finishes_first_at_once(workbench, tiny_folder,
                                                                                     early_and_late):
    prompts, stop, length = early_and_late
    dash = Dashboard(workbench, mode="widget")
    seen = []  # (the call runs, each prompt's ids shown) at each tick of the wait loop

    def tick():
        seen.append((dash.state == "running", [list(p.ids) for p in dash.texts.lines()]))

    result = workbench.generate(prompts, strategy="data", model=tiny_folder, max_new_tokens=LATE, ignore_eos=True,
                                stop=[stop], dashboard=dash, on_tick=tick)
    assert result.stop_reasons == ["stop", "length"]
    assert [len(t) for t in result.token_ids] == [length, LATE]
    # The last tick comes before the result is merged: the engines' final snapshots already
    # carried every token of every prompt.
    running, shown = seen[-1]
    assert running and shown == result.token_ids
    # Replica 0 was done while replica 1 still generated: all of its tokens were in view then.
    assert any(running and ids[0] == result.token_ids[0] and len(ids[1]) < LATE for running, ids in seen)
    # Merged: each prompt's count is the result's.
    import re

    notes = [re.search(r'class="mpbook-prompt-note"[^>]*>\((.*?)\)<', line).group(1) for line in dash.view.prompt_values()]
    assert notes == [f"{len(t)} tokens · first after {times[0]:.2f} s" for t, times in zip(result.token_ids, result.token_times)]


@pytest.mark.cluster
def test_a_run_cell_without_tokens_shows_its_time_and_no_token_plot(workbench):
    import re

    dash = Dashboard(workbench, mode="widget")
    began = time.monotonic()
    workbench.run("import time\ntime.sleep(0.2)\nx = rank", dashboard=dash)
    took = time.monotonic() - began
    said = re.fullmatch(r"done in (\d+) ms", dash.headline)
    assert said and 200 <= int(said.group(1)) <= took * 1000 + 1, (dash.headline, took)
    assert "done in" in dash.view.status.value and "0.0 s" not in dash.view.status.value
    assert dash.view.plot.layout.display == "none" and dash.view.plot.value == ""


@pytest.mark.cluster
def test_the_end_state_names_the_rank_that_failed(workbench):
    dash = Dashboard(workbench, mode="widget")
    with pytest.raises(RankError):
        workbench.run("import time\ntime.sleep(0.3)\nif rank == 1:\n    raise ValueError('bad shard')", dashboard=dash)
    status = dash.view.status.value
    assert "✗" in status and "failed on rank 1" in status and "ValueError: bad shard" in status
    values = dash.view.values()
    assert values[1]["phase"] == "failed" and values[0]["phase"] == "idle"
    # the next call starts clean
    workbench.run("pass", dashboard=dash)
    assert "✓" in dash.view.status.value and dash.view.values()[1]["phase"] == "idle"


@pytest.mark.cluster
def test_a_broken_display_never_costs_the_call(workbench, caplog):
    closed = io.StringIO()
    closed.close()
    dash = Dashboard(workbench, mode="text", text_every_s=0.0, out=closed)
    with caplog.at_level("WARNING", logger="mpbook.dashboard"):
        workbench.run("import time\ntime.sleep(0.5)\nx = rank", dashboard=dash)
    assert "the mpbook dashboard stopped updating" in caplog.text
    assert workbench.client[workbench.engine_ids()].pull("x", block=True) == [0, 1]


@pytest.mark.cluster
def test_text_fallback_in_a_terminal_shell(shell, capsys, monkeypatch):
    monkeypatch.setattr(mpbook.dashboard.text_view, "TEXT_EVERY_S", 0.8)
    assert shell.run_cell("%mp start -n 2 --cpu").success
    capsys.readouterr()

    result = shell.run_cell("%%mp run\n" + GENERATE_CELL)
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[mpbook")]
    # a few compact lines: one per rank (plus the total) at most every 0.8 s of a ~2.5 s cell
    assert 2 <= len(lines) <= 3 * 5, out
    assert any("rank 0" in line and "tok/s" in line for line in lines)
    assert any("decode" in line for line in lines)
    assert "mpbook: done in" in out and "prefill 32 tokens" in out and "decode 80 tokens" in out
    assert "Traceback" not in out

    # a quick cell without tokens prints nothing extra; --no-dashboard prints no dashboard at all
    assert shell.run_cell("%%mp run\nprint('hi', rank)").success
    assert "mpbook" not in capsys.readouterr().out
    assert shell.run_cell("%%mp run --no-dashboard\n" + GENERATE_CELL).success
    assert "mpbook" not in capsys.readouterr().out

    # no event loop between commands here: the standing dashboard shows the engines once
    assert shell.run_cell("%mp dashboard").success
    out = capsys.readouterr().out
    assert "the engines now" in out and "rank 1 cpu" in out and "idle" in out
    result = shell.run_cell("%mp dashboard --period 0")
    assert isinstance(result.error_in_exec, UsageError) and "argument --period: '0': refresh every" in str(result.error_in_exec)
    assert shell.run_cell("%mp stop").success


@pytest.mark.cluster
def test_text_fallback_in_a_script(tmp_path):
    script = tmp_path / "watch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import mpbook.dashboard.text_view
            from mpbook import Workbench
            from mpbook.dashboard import Dashboard

            mpbook.dashboard.text_view.TEXT_EVERY_S = 1.0
            with Workbench.start(2, cpu=True) as wb:
                assert Dashboard(wb).mode == "text"
                wb.run({GENERATE_CELL!r}, dashboard=True)
            print("finished")
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("[mpbook")]
    assert 2 <= len(rows) <= 3 * 3, out
    assert "mpbook: done in" in out and out.rstrip().endswith("finished")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- a real kernel
def _execute(kc, code: str, timeout: float = 120.0):
    """Run ``code`` in the kernel; return its reply and every IOPub message until it is idle
    (whatever their parent: a standing dashboard's updates belong to an earlier cell)."""
    msg_id = kc.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        msg["received"] = time.monotonic()
        messages.append(msg)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def _values(messages) -> list[tuple[float, str]]:
    """(time received, value) of every widget value update in ``messages``."""
    return [
        (m["received"], m["content"]["data"]["state"]["value"])
        for m in messages
        if m["msg_type"] == "comm_msg" and "value" in m["content"]["data"].get("state", {})
    ]


def _text(messages) -> str:
    return "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")


@pytest.mark.cluster
def test_in_a_jupyter_kernel_the_widgets_update_live_and_the_standing_dashboard_refreshes():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _execute(kc, "%load_ext mpbook\n%mp start -n 2 --cpu")
        shown = _execute(kc, "%mp dashboard --period 0.3")
        assert any(
            "application/vnd.jupyter.widget-view+json" in m["content"].get("data", {})
            for m in shown
            if m["msg_type"] == "display_data"
        )

        ran = _execute(kc, "%%mp run\n" + GENERATE_CELL)
        # the cell's own dashboard was displayed, then updated many times while it ran
        assert sum(m["msg_type"] == "display_data" for m in ran) == 1
        running = [(t, v) for t, v in _values(ran) if "running ·" in v]
        assert len(running) >= 4 and running[-1][0] - running[0][0] >= 1.0
        rates = {v for _, v in _values(ran) if v.replace(".", "", 1).isdigit() and float(v) > 5}
        assert len(rates) >= 2  # tokens/s labels took several values
        done = [v for _, v in _values(ran) if "done in" in v]
        assert done and "prefill 32 tokens" in done[-1] and "decode 80 tokens" in done[-1]

        # between cells the standing dashboard asks the engines itself
        idle = _execute(kc, "import asyncio\nawait asyncio.sleep(1.5)\nstanding = get_ipython().magics_manager.registry['MpMagics'].standing\nprint('polls', standing.polls, standing.running)")
        assert any("engines idle" in v for _, v in _values(idle))
        polls = int(_text(idle).split()[1])
        assert polls >= 3 and "True" in _text(idle)

        stopped = _execute(kc, "%mp stop\nprint('still refreshing:', standing.running)")
        assert "still refreshing: False" in _text(stopped)
        assert any("the cluster stopped" in v for _, v in _values(stopped))
        after = _execute(kc, "import asyncio\nawait asyncio.sleep(0.5)\nprint('task done:', standing._task.done())")
        assert "task done: True" in _text(after)  # and the kernel carries on
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.cluster
def test_the_dashboard_says_each_ranks_transport_and_decode_step_once_merged(workbench, tiny_folder):
    dash = Dashboard(workbench, mode="widget")
    result = workbench.generate(["Hello there", "What is an all-reduce?"], strategy="tensor", model=tiny_folder,
                                max_new_tokens=8, ignore_eos=True, dashboard=dash)
    values = dash.view.values()
    for rank in (0, 1):
        assert values[rank]["collectives"].endswith(" mpi"), values[rank]
        step = values[rank]["decode step"]
        parts = result.step_breakdown[rank]
        # the rank's mean step and its parts, in ms, as the result measured them
        assert step.startswith(f"{1e3 * parts['steps'] / parts['count']:.2f} ms: compute "), step
        assert [w for w in ("coll", "wait", "choice", "host") if f" {w} " in step] == ["coll", "wait", "choice", "host"]
