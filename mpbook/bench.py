"""``python -m mpbook bench``: measure, side by side in one run.

Strategies (default): the same model and prompts on one device (a one-engine cluster) and
on every strategy over all engines; runs are interleaved over ``--repeats`` rounds and the
median of each is kept, so that drift of a noisy machine hits every layout alike. Each
record also says how far its logits are from the one-device run and whether its greedy
tokens are identical.

The same run measures the machine's ceiling twice (``--window`` seconds per round; ``0`` skips
both): every engine generating its share at once against one engine doing every prompt, with
mpbook's own step (each engine's share of a data-parallel run, looped by itself: the headline;
one round of it before each round of the layouts, so that the machine's drift hits both) and,
first, with transformers' ``generate`` (its weights stored as an engine stores them), and shows
each layout as a % of each (:mod:`mpbook.bench_peers`).

``--against transformers``: transformers' own distributed forms on the same engines, layout by
layout, in one table (:mod:`mpbook.bench_peers`).

``--cluster``: the cluster's own costs: start to ready (median of 5) and an empty
``%%mp run`` round trip next to ipyparallel's ``dv.execute('pass')``.

``--soak N``: N consecutive generation cells through a real IPython shell (the magic, the
dashboard and all), counting failures and the engines' memory growth after warm-up.

``--dashboard-overhead``: what watching costs. The same generation runs with the dashboard
and live text on (engines publish snapshots with each prompt's new tokens, the client
refreshes a widget dashboard whose prompt lines grow) and off (no publishing, no streaming,
no dashboard), interleaved A B B A; the report is the median ratio of their times, of the
engines' CPU time (which other processes' load does not blur) and of the decode's tokens/s
(target: at most 2% lost), with how often each prompt's text grew.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from .layout import Layout
from .planner.workload import SAMPLE_PROMPTS as BENCH_PROMPTS, sample_prompts as bench_prompts
from .protocol import DEFAULT_DTYPE, DEFAULT_MODEL


@dataclass(frozen=True)
class BenchCase:
    """One layout the bench measures against one device: its strategy, layout and micro-batches."""

    strategy: str
    layout: Layout
    microbatches: int

    def label(self) -> str:
        return f"{self.strategy} {self.layout} m={self.microbatches}"


def candidate_layouts(config, engines: int, batch: int, *, sweep: bool,
                      ranks_at_once: int | None = None) -> list[BenchCase]:
    """The layouts to measure: each strategy at full degree, or (sweep) every valid one; each
    with the micro-batches a cell takes by default on engines of which ``ranks_at_once`` can
    compute at once (:attr:`mpbook.cluster.Cluster.ranks_at_once`)."""
    from .errors import MpbookError
    from .models.support import validate_tp

    def valid(layout: Layout) -> bool:
        try:
            validate_tp(config, layout.tp)
        except MpbookError:
            return False
        return layout.pp <= config.num_hidden_layers and layout.dp <= batch

    def microbatches(layout: Layout) -> int:
        from .parallel.pipeline import layout_microbatches

        return layout_microbatches(layout, batch // layout.dp, ranks_at_once)  # what a cell takes by default

    def strategy_of(layout: Layout) -> str:
        for name, dim in (("tensor", "tp"), ("pipeline", "pp"), ("data", "dp")):
            if getattr(layout, dim) > 1:
                return name
        return "data"

    if sweep:
        layouts = [
            Layout(dp, pp, engines // (dp * pp))
            for dp in range(1, engines + 1)
            for pp in range(1, engines + 1)
            if engines % (dp * pp) == 0
        ]
    else:
        layouts = [Layout(dp=engines), Layout(pp=engines), Layout(tp=engines)]
    return [BenchCase(strategy_of(lay), lay, microbatches(lay)) for lay in layouts if valid(lay)]


def bench_strategies(
    *,
    model: str = DEFAULT_MODEL,
    engines: int | None = None,
    cpu: bool = False,
    batch: int = 8,
    new_tokens: int = 16,
    dtype: str = DEFAULT_DTYPE,
    repeats: int = 3,
    sweep: bool = False,
    window_s: float = 5.0,
    transport: str = "auto",
    compile: bool = False,
    log=print,
) -> list[dict[str, Any]]:
    from . import bench_peers, models
    from .workbench import Workbench

    prompts = bench_prompts(batch)
    config = models.load_config(model)
    records: list[dict[str, Any]] = []
    with Workbench.start(engines, cpu=cpu, transport=transport) as wb, \
            Workbench.start(1, cpu=cpu, threads=wb.engine_spec.threads) as single:
        # "One device" is one engine with the same share of the machine as each of the
        # others: one GPU, or on a CPU the same number of threads.
        cases = candidate_layouts(config, wb.world_size, batch, sweep=sweep, ranks_at_once=wb.cluster.ranks_at_once)
        if sweep:
            cases = _that_fit(cases, model=model, wb=wb, batch=batch, new_tokens=new_tokens, dtype=dtype, log=log)
        log(f"model {model}, {batch} prompts, {new_tokens} new tokens, {dtype}{', compiled' if compile else ''}; "
            f"one device vs {wb.world_size} engines ({wb.device_type}); {repeats} interleaved rounds")
        theirs = own = None
        if window_s > 0:
            # transformers' first, on engines that hold no model yet (it drops its own when
            # done): the engines never hold its copy beside mpbook's. Then mpbook's own step
            # (the headline: the most the layouts' own step can gain), one round before each
            # round of the layouts, so that a drift of the machine (a neighbour's load on a
            # VM comes and goes over minutes) hits the ceiling and the layouts alike.
            ids, pad_id = bench_peers.encode(model, prompts, chat=None)  # as generate encodes them
            theirs = bench_peers.measure_ceiling(wb, model=model, dtype=dtype, ids=ids, pad_id=pad_id,
                                                 new_tokens=new_tokens, window_s=window_s, rounds=repeats)
            own = bench_peers.own_ceiling_rounds(
                wb, single, prompts, window_s=window_s, model=model, max_new_tokens=new_tokens,
                dtype=dtype, ignore_eos=True, compile=compile)

        # ignore_eos: every run generates the same number of tokens, whatever the model says.
        def one_device(max_new_tokens):
            return single.generate(prompts, strategy="data", model=model, max_new_tokens=max_new_tokens, dtype=dtype,
                                   ignore_eos=True, compile=compile and max_new_tokens > 0)

        def layout_run(case, max_new_tokens):
            return wb.generate(
                prompts, strategy=case.strategy, model=model, max_new_tokens=max_new_tokens, dtype=dtype,
                dp=case.layout.dp, pp=case.layout.pp, tp=case.layout.tp, microbatches=case.microbatches,
                ignore_eos=True, compile=compile and max_new_tokens > 0,
            )

        # Correctness first (a forward pass each), then the timed generations.
        base_forward = one_device(0)
        forward = {case: layout_run(case, 0) for case in cases}
        runs: dict[Any, list] = {"single": []}
        runs.update({case: [] for case in cases})
        one_device(new_tokens)  # warm-up: loads and first-touch
        for case in cases:
            layout_run(case, new_tokens)
        for _ in range(repeats):
            if own is not None:
                own.round()
            runs["single"].append(one_device(new_tokens))
            for case in cases:
                runs[case].append(layout_run(case, new_tokens))

        base_tokens = runs["single"][0].token_ids
        for key, results in runs.items():
            record = _median_record(results)
            # Where a decode step's time went, per rank, in the round of the median decode rate
            # (the parts of one round add up to its steps; medians of parts would not).
            median_round = sorted(results, key=lambda r: r.decode_tokens_per_s)[len(results) // 2]
            record["step_breakdown_ms"] = median_round.step_ms()
            if key == "single":
                record.update(strategy="single", max_abs_logit_diff=0.0, tokens_match=True)
            else:
                record["microbatches"] = key.microbatches
                record["max_abs_logit_diff"] = max(
                    float((a - b).abs().max()) for a, b in zip(forward[key].logits, base_forward.logits)
                )
                record["tokens_match"] = all(r.token_ids == base_tokens for r in results)
            records.append(record)
            log(_row(record, records[0]))
            words = median_round.step_words()
            if words:
                log(f"    {words} (the round of the median decode rate)")
        if own is not None:
            log(bench_peers.ceiling_shares(records, own.ceiling(interleaved=True), theirs))
    return records


def _that_fit(cases, *, model, wb, batch, new_tokens, dtype, log) -> list[BenchCase]:
    """The layouts whose predicted per-rank memory fits the engines' free memory."""
    from . import models
    from .planner import plan as memory_plan

    tokenizer = models.load_tokenizer(model)
    prompt_len = max(len(ids) for ids in tokenizer(BENCH_PROMPTS)["input_ids"])
    free = [e.memory_free_bytes for e in wb.status()]
    kept = []
    for case in cases:
        predicted = memory_plan(
            model, dp=case.layout.dp, pp=case.layout.pp, tp=case.layout.tp, batch=batch, prompt_len=prompt_len,
            max_new_tokens=new_tokens, dtype=dtype, microbatches=case.microbatches, device_memory_bytes=free,
        )
        if predicted.fits:
            kept.append(case)
        else:
            log(f"  skipped {case.label()}: predicted peak {max(r.total for r in predicted.ranks) / 2**30:.2f} GiB "
                "does not fit")
    return kept


def _median_record(results) -> dict[str, Any]:
    from .bench_peers import generation_tokens_per_s

    record = results[0].record()
    record["generation_tokens_per_s_rounds"] = [generation_tokens_per_s(r) for r in results]
    record["generation_tokens_per_s"] = statistics.median(record["generation_tokens_per_s_rounds"])
    record["prefill_tokens_per_s"] = statistics.median(r.prefill_tokens_per_s for r in results)
    record["decode_tokens_per_s"] = statistics.median(r.decode_tokens_per_s for r in results)
    record["peak_memory_bytes"] = [max(r.peak_memory_bytes[i] for r in results) for i in range(results[0].engines)]
    latencies = [r.latency() for r in results]
    record["latency"] = {key: statistics.median(l[key] for l in latencies) for key in latencies[0]}
    record["repeats"] = len(results)
    return record


def _row(record: dict[str, Any], base: dict[str, Any]) -> str:
    from .results import latency_words
    from .units import format_bytes

    ratio = record["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base["decode_tokens_per_s"] else 0.0
    return (
        f"  {record['strategy']:<8} dp={record['dp']} pp={record['pp']} tp={record['tp']}: "
        f"prefill {record['prefill_tokens_per_s']:>9,.0f} tok/s, decode {record['decode_tokens_per_s']:>8,.1f} tok/s "
        f"({ratio:.2f}x one device), weights/rank {format_bytes(max(record['weight_bytes']))}, "
        f"max|dlogit| {record['max_abs_logit_diff']:.1e}, tokens {'match' if record['tokens_match'] else 'DIFFER'}"
        + (f"; {latency_words(record['latency'])}" if record.get("latency") else "")
    )


def bench_cluster(*, engines: int = 2, cpu: bool = True, starts: int = 5, round_trips: int = 50, log=print) -> dict:
    """Start-to-ready and the empty-cell round trip, next to ipyparallel's own execute."""
    from .workbench import Workbench

    start_times = []
    for _ in range(starts):
        began = time.perf_counter()
        wb = Workbench.start(engines, cpu=cpu)
        start_times.append(time.perf_counter() - began)
        wb.stop()
    with Workbench.start(engines, cpu=cpu) as wb:
        view = wb.client[wb.engine_ids()]
        view.execute("pass", block=True)
        ours, theirs = [], []
        for _ in range(round_trips):  # interleaved, so both see the same machine
            began = time.perf_counter()
            view.execute("pass", block=True)
            theirs.append(time.perf_counter() - began)
            began = time.perf_counter()
            wb.run("pass")
            ours.append(time.perf_counter() - began)
    result = {
        "engines": engines,
        "start_seconds": start_times,
        "start_median_s": statistics.median(start_times),
        "mp_run_median_ms": 1000 * statistics.median(ours),
        "ipyparallel_execute_median_ms": 1000 * statistics.median(theirs),
    }
    result["round_trip_ratio"] = result["mp_run_median_ms"] / result["ipyparallel_execute_median_ms"]
    log(
        f"cluster start to ready ({engines} {'CPU' if cpu else 'GPU'} engines, process group up): "
        f"median {result['start_median_s']:.2f} s of {starts} ({', '.join(f'{t:.2f}' for t in start_times)})\n"
        f"empty %%mp run round trip: median {result['mp_run_median_ms']:.2f} ms; ipyparallel dv.execute('pass'): "
        f"{result['ipyparallel_execute_median_ms']:.2f} ms; ratio {result['round_trip_ratio']:.2f}x (of {round_trips})"
    )
    return result


def write_json(path: str, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def _set_publishing(state, on: bool) -> None:
    state.publisher.enabled = on


def _published(state) -> int:
    return state.publisher.published


@dataclass(frozen=True)
class Sample:
    """One run of the workload."""

    engine_s: float  # prefill + decode, wall time on the engines
    engine_cpu_s: float  # CPU time of the engine processes during the call, all ranks
    wall_s: float  # the client's wall time of the call
    client_cpu_s: float  # the client's CPU time during the call (the dashboard's drawing included)
    decode_tok_s: float  # the result's decode tokens/s


def _median_ratio(on: list[float], off: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(on, off))


@dataclass(frozen=True)
class OverheadReport:
    rounds: int
    steps: int
    on: list[Sample]  # dashboard and live text on: engines publish and stream, the client refreshes a widget dashboard
    off: list[Sample]
    snapshots_per_s: float  # published per engine per second, dashboard on
    refreshes_per_s: float  # dashboard view refreshes per second
    text_updates_per_s: float = 0.0  # times a prompt's text grew in the dashboard, per prompt per second of decode
    streaming: bool = False  # the dashboard saw the prompts' texts grow

    def ratio(self, field: str) -> float:
        """Median over the A/B pairs of on/off for one field of :class:`Sample`."""
        return _median_ratio([getattr(s, field) for s in self.on], [getattr(s, field) for s in self.off])

    @property
    def engine_ratio(self) -> float:
        """The slowdown of the engines' work (wall time; noisy when the machine is shared)."""
        return self.ratio("engine_s")

    @property
    def engine_cpu_ratio(self) -> float:
        """The engines' CPU time on/off: the publisher's cost, robust to other processes' load."""
        return self.ratio("engine_cpu_s")

    @property
    def decode_overhead(self) -> float:
        """The decode's tokens/s lost to watching: 1 - on/off (target: at most 0.02)."""
        return 1 - self.ratio("decode_tok_s")

    @property
    def client_cpu_added(self) -> float:
        """CPU seconds the client spends on the dashboard per second of the call."""
        on = statistics.median(s.client_cpu_s / s.wall_s for s in self.on)
        off = statistics.median(s.client_cpu_s / s.wall_s for s in self.off)
        return on - off

    def format(self) -> str:
        med = statistics.median

        def line(name: str, field: str) -> str:
            a, b, r = med(getattr(s, field) for s in self.on), med(getattr(s, field) for s in self.off), self.ratio(field)
            return f"  {name:<18} on {a:.3f} s  off {b:.3f} s  ratio {r:.4f} ({(r - 1) * 100:+.2f}%)"

        return "\n".join(
            [
                f"dashboard overhead: {self.rounds} rounds A B B A, {self.steps} generated tokens per prompt per run "
                "(median of on/off pairs)",
                line("generation, wall", "engine_s"),
                line("engines, CPU", "engine_cpu_s"),
                line("client call, wall", "wall_s"),
                f"  client CPU added by the dashboard: {self.client_cpu_added * 100:.2f}% of a core",
                f"  while on: {self.snapshots_per_s:.1f} snapshots/s per engine, "
                f"{self.refreshes_per_s:.1f} dashboard refreshes/s",
                f"  decode tokens/s    on {med(s.decode_tok_s for s in self.on):,.1f}  "
                f"off {med(s.decode_tok_s for s in self.off):,.1f}  ratio {1 - self.decode_overhead:.4f} "
                f"({-self.decode_overhead * 100:+.2f}%; target: no more than 2% lost)",
                f"  live text: {self.text_updates_per_s:.1f} updates/s per prompt while decoding (target at least 2)"
                if self.streaming else
                "  live text: no prompt's text grew in the dashboard (a run too short to see it?)",
            ]
        )


def _engine_cpu_seconds(state) -> float:
    return time.process_time()


def dashboard_overhead(
    wb, *, rounds: int = 6, model: str = DEFAULT_MODEL, strategy: str = "pipeline", batch: int = 4, new_tokens: int = 64
) -> OverheadReport:
    """Generate with the dashboard on and off, interleaved, on every rank of ``wb``."""
    from .dashboard import Dashboard

    if rounds < 1 or new_tokens < 2:
        raise ValueError(f"rounds={rounds}, new_tokens={new_tokens}: need at least one round of 2 or more tokens")
    prompts = (BENCH_PROMPTS * batch)[:batch]
    steps = new_tokens

    def run(steps: int, on: bool) -> tuple[Sample, Dashboard | None, float]:
        wb.apply(_set_publishing, on, stream=False, what="switching the publisher")
        dash = Dashboard(wb, mode="widget") if on else None
        cpu_before = wb.apply(_engine_cpu_seconds, stream=False)
        began, cpu0 = time.perf_counter(), time.process_time()
        # ignore_eos: every run generates the same number of tokens, whatever the model says
        result = wb.generate(prompts, strategy=strategy, model=model, max_new_tokens=steps, dashboard=dash or False,
                             ignore_eos=True, stream=on)
        wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu0
        cpu_after = wb.apply(_engine_cpu_seconds, stream=False)
        engine_cpu = sum(b - a for a, b in zip(cpu_before, cpu_after))
        sample = Sample(result.prefill_seconds + result.decode_seconds, engine_cpu, wall, client_cpu,
                        result.decode_tokens_per_s)
        return sample, dash, result.decode_seconds

    try:
        run(steps, False)  # warm-up: loads the model
        on: list[Sample] = []
        off: list[Sample] = []
        published_before = sum(wb.apply(_published, stream=False))
        refreshes = text_updates = 0
        decode_on = 0.0
        for i in range(rounds):
            for publishing in (True, False) if i % 2 == 0 else (False, True):
                sample, dash, decode_s = run(steps, publishing)
                (on if publishing else off).append(sample)
                if dash is not None:
                    refreshes += dash.refreshes
                    text_updates += dash.texts.updates
                    decode_on += decode_s
        published = sum(wb.apply(_published, stream=False)) - published_before
    finally:
        wb.apply(_set_publishing, True, stream=False, what="switching the publisher back on")
    on_time = sum(s.wall_s for s in on)
    return OverheadReport(
        rounds=rounds,
        steps=steps,
        on=on,
        off=off,
        snapshots_per_s=published / wb.world_size / on_time,
        refreshes_per_s=refreshes / on_time,
        text_updates_per_s=text_updates / len(prompts) / decode_on if decode_on else 0.0,
        streaming=text_updates > 0,
    )


SOAK_CELL = "%%mp pipeline --model {model} --microbatches 2 --max-new-tokens 16\n" + "\n".join(BENCH_PROMPTS[:4])


def bench_soak(*, cells: int = 200, warmup: int = 20, model: str = DEFAULT_MODEL, engines: int | None = None,
               cpu: bool = True, log=print) -> dict:
    """``cells`` generation cells in a row on one cluster; failures and per-engine memory growth."""
    import contextlib
    import io

    from IPython.core.interactiveshell import InteractiveShell

    from .soak import soak

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mpbook")
    magics = shell.magics_manager.registry["MpMagics"]
    shell.run_line_magic("mp", f"start {'-n ' + str(engines) if engines else ''} {'--cpu' if cpu else ''}")
    try:
        wb = magics.workbench
        pids = [e.pid for e in wb.engines]
        with contextlib.redirect_stdout(io.StringIO()):  # 200 cells of generations and summaries
            report = soak(shell, SOAK_CELL.format(model=model), pids, cells=cells, warmup=warmup)
    finally:
        magics.close()
    log(f"soak: {report.summary()}")
    return {
        "cells": report.cells, "completed": len(report.seconds), "failure": report.failure,
        "median_cell_s": sorted(report.seconds)[len(report.seconds) // 2],
        "rss_growth": {str(pid): g for pid, g in report.growth().items()}, "max_rss_growth": report.max_growth(),
    }


CELL_PROMPTS = "\n".join(BENCH_PROMPTS[:4])


def bench_cell_overhead(*, cells: int = 20, model: str = DEFAULT_MODEL, engines: int | None = None, cpu: bool = True,
                        log=print) -> dict:
    """What a strategy cell costs the client beyond the engines' own time, on a model already
    loaded: every cell runs through a real IPython shell (the magic, checks, tokenizing, the
    transfer, merging, printing), and the engines report how long their part took."""
    import contextlib
    import io

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mpbook")
    magics = shell.magics_manager.registry["MpMagics"]
    shell.run_line_magic("mp", f"start {'-n ' + str(engines) if engines else ''} {'--cpu' if cpu else ''}")
    report: dict[str, Any] = {"cells": cells, "model": model}
    try:
        for strategy in ("data", "pipeline", "tensor"):
            for dashboard in (False, True):
                flag = "" if dashboard else " --no-dashboard"
                cell = f"%%mp {strategy} --model {model} --max-new-tokens 8{flag}\n{CELL_PROMPTS}"
                with contextlib.redirect_stdout(io.StringIO()):
                    shell.run_cell(cell)  # loads the model: not measured
                    cell_s, client_s, engine_s = [], [], []
                    for _ in range(cells):
                        began = time.perf_counter()
                        result = shell.run_cell(cell)
                        wall = time.perf_counter() - began
                        if not result.success:
                            raise RuntimeError(f"{strategy} cell failed: {result.error_in_exec}")
                        run = shell.user_ns["_mp"]
                        engine = max(run.engine_seconds)
                        cell_s.append(wall)
                        engine_s.append(engine)
                        client_s.append(wall - engine)
                key = f"{strategy}{'' if dashboard else ' --no-dashboard'}"
                report[key] = {
                    "cell_median_ms": 1e3 * statistics.median(cell_s),
                    "engine_median_ms": 1e3 * statistics.median(engine_s),
                    "client_median_ms": 1e3 * statistics.median(client_s),
                    "client_p90_ms": 1e3 * sorted(client_s)[int(0.9 * (len(client_s) - 1))],
                }
                r = report[key]
                log(f"  {key:<26} cell {r['cell_median_ms']:7.1f} ms = engines {r['engine_median_ms']:7.1f} ms "
                    f"+ client {r['client_median_ms']:5.1f} ms (p90 {r['client_p90_ms']:.1f} ms), median of {cells}")
    finally:
        magics.close()
    return report
