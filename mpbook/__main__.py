"""``python -m mpbook demo``, ``python -m mpbook bench`` and ``python -m mpbook conformance``."""

from __future__ import annotations

import argparse
import sys
import time

from .protocol import DEFAULT_DTYPE, DEFAULT_MODEL


def demo(args: argparse.Namespace) -> int:
    from .errors import MpbookError
    from .workbench import Workbench

    began = time.perf_counter()
    with Workbench.start(args.n, cpu=args.cpu) as wb:
        print(f"started {wb.world_size} engines in {time.perf_counter() - began:.1f} s")
        print(wb.table())
        print("\nall_reduce of each rank's (rank + 1) across the process group:")
        code = "t = torch.tensor([rank + 1.0], device=device)\ndist.all_reduce(t)\nprint(f'sum = {t.item():g}')"
        # Outside a notebook the dashboard prints as text (quiet for a call this short).
        wb.run(code, dashboard=True)
        prompts = ["Explain pipeline parallelism in one sentence.", "What does an all-reduce do?"]
        print(f"\ngreedy generation with the built-in '{args.model}' model, each strategy over {wb.world_size} engines:")
        # The engines' first run pays once for what every later one reuses (transformers
        # imported, the tokenizer, first-time kernel set-up): untimed, so that the rates below
        # compare the strategies, not a cold start against warm ones.
        warm_up = time.perf_counter()
        try:
            wb.generate(prompts, strategy="data", model=args.model, max_new_tokens=2)
            print(f"  (a first, untimed run loaded the model and warmed the engines: {time.perf_counter() - warm_up:.1f} s)")
        except MpbookError:  # e.g. a model too big for one engine: data parallel's own run below says why
            pass
        results = {}
        for strategy in ("data", "pipeline", "tensor"):
            try:
                results[strategy] = wb.generate(prompts, strategy=strategy, model=args.model,
                                                max_new_tokens=args.max_new_tokens)
            except MpbookError as exc:  # e.g. a tp that does not divide this model's heads
                print(f"  {strategy}: skipped ({exc})")
                continue
            print("  " + results[strategy].summary())
        first = next(iter(results.values()))
        for i, prompt in enumerate(prompts):
            print(f"  [{i}] {prompt!r} -> {first.texts[i]!r}")
        same = all(r.token_ids == first.token_ids for r in results.values())
        print(f"  every strategy generated the same tokens: {same}")
    print("stopped the cluster")
    return 0 if same else 1


def bench(args: argparse.Namespace) -> int:
    from . import bench as benchmarks

    if args.links:
        from .bench_links import format_links
        from .workbench import Workbench

        with Workbench.start(args.n, cpu=args.cpu, hosts=args.hosts, transport="gloo") as wb:
            links = wb.measure_links()
            print(format_links(links))
        payload = [link.__dict__ for link in links]
    elif args.predict:
        from .bench_predict import bench_predict

        payload = bench_predict(models=args.model.split(","), engines=args.n, cpu=args.cpu, batch=args.batch,
                                new_tokens=args.new_tokens, dtype=args.dtype, repeats=args.repeats)
    elif args.collectives:
        from . import bench_transports

        timings = bench_transports.bench_collectives(engines=args.n or 2)
        print(bench_transports.format_timings(timings, args.n or 2))
        payload = [t.__dict__ for t in timings]
    elif args.against:
        from . import bench_peers

        payload = bench_peers.bench_against_transformers(
            benchmarks.bench_prompts(args.batch), model=args.model, engines=args.n, cpu=args.cpu,
            new_tokens=args.new_tokens,
            dtype=args.dtype, repeats=args.repeats, window_s=args.window, transport=args.transport,
            compile=args.compile,
        )
    elif args.cluster:
        payload = benchmarks.bench_cluster(engines=args.n or 2, cpu=True)
    elif args.cell_overhead:
        payload = benchmarks.bench_cell_overhead(cells=args.repeats * 5, model=args.model, engines=args.n, cpu=args.cpu)
    elif args.soak:
        payload = benchmarks.bench_soak(cells=args.soak, model=args.model, engines=args.n, cpu=args.cpu)
    elif args.dashboard_overhead:
        from .workbench import Workbench

        with Workbench.start(args.n, cpu=args.cpu) as wb:
            print(f"{wb.world_size} engines on {wb.device_type}")
            report = benchmarks.dashboard_overhead(
                wb, rounds=args.repeats * 2, model=args.model, batch=min(args.batch, 4), new_tokens=args.new_tokens * 4
            )
            print(report.format())
            payload = {"engine_ratio": report.engine_ratio, "engine_cpu_ratio": report.engine_cpu_ratio,
                       "client_cpu_added": report.client_cpu_added, "decode_overhead": report.decode_overhead,
                       "text_updates_per_s": report.text_updates_per_s, "streaming": report.streaming}
    else:
        payload = benchmarks.bench_strategies(
            model=args.model, engines=args.n, cpu=args.cpu, batch=args.batch, new_tokens=args.new_tokens,
            dtype=args.dtype, repeats=args.repeats, sweep=args.sweep, window_s=args.window, transport=args.transport,
            compile=args.compile,
        )
    path = args.json or ("bench-sweep.json" if args.sweep else None)
    if path:
        benchmarks.write_json(path, payload)
        print(f"wrote {path}")
    if args.sweep:
        from .plots import plot_throughput

        png = path.removesuffix(".json") + ".png"
        plot_throughput(payload).savefig(png, dpi=120)
        print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .conformance import add_command

    parser = argparse.ArgumentParser(prog="python -m mpbook", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_bench(commands)
    add_command(commands)
    return parser


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=None, help="engines (default: one per GPU, else 2 CPU engines)")
    p.add_argument("--cpu", action="store_true", help="CPU engines even if GPUs are visible")


def _add_demo(commands) -> None:
    d = commands.add_parser("demo", help="start engines, run the strategies on a tiny model, stop")
    _engine_options(d)
    d.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model for the generation part (default: the built-in {DEFAULT_MODEL})")
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.set_defaults(func=demo)


def _add_bench(commands) -> None:
    b = commands.add_parser("bench", help="measure one device against each strategy, side by side")
    _engine_options(b)
    _bench_workload_options(b)
    _bench_kind_options(b)
    b.add_argument("--json", default=None, metavar="PATH", help="write the records to PATH")
    b.set_defaults(func=bench)


def _bench_workload_options(b: argparse.ArgumentParser) -> None:
    """What each measured run generates, on what, how often, and how it is compared."""
    b.add_argument("--model", default=DEFAULT_MODEL, help="a preset (tiny, small, llama-135m), a folder or a hub id")
    b.add_argument("--batch", type=int, default=8, help="prompts per run (default 8)")
    b.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    b.add_argument("--dtype", default=DEFAULT_DTYPE)
    b.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept (default 3)")
    b.add_argument("--sweep", action="store_true",
                   help="every layout that fits the engines, not one per strategy; writes JSON and a PNG plot")
    b.add_argument("--window", type=float, default=5.0, metavar="S",
                   help="seconds per round of the machine's ceilings (every engine generating its share at once, "
                        "against one engine with every prompt; with plain transformers, measured first, and with "
                        "mpbook's own step, a round before each round of the layouts); 0 skips them (default 5)")
    b.add_argument("--transport", choices=["auto", "mpi", "gloo"], default="auto",
                   help="what the CPU engines' collectives use (default: MPI when installed)")
    b.add_argument("--compile", action="store_true",
                   help="mpbook's layouts with --compile (static KV cache, compiled decode step; compiled in the "
                        "warm-up round, before any timed one)")


def _bench_kind_options(b: argparse.ArgumentParser) -> None:
    """The other measurements ``bench`` makes instead of the strategies against one device."""
    b.add_argument("--against", choices=["transformers"], default=None,
                   help="transformers' own data, tensor (DistributedConfig(tp_size=N)) and pipeline (pp_size=N) "
                        "forms on the same engines, interleaved with mpbook's, in one table")
    b.add_argument("--cluster", action="store_true", help="measure cluster start-up and the %%%%mp run round trip")
    b.add_argument("--predict", action="store_true",
                   help="calibrate the engines, then every layout of --model (comma-separated models) that fits: "
                        "predicted against measured decode tok/s (mpbook.plan's speed model)")
    b.add_argument("--collectives", action="store_true",
                   help="all-reduce (4 KiB-4 MiB) and send/recv latency per transport (gloo, MPI), median and p90")
    b.add_argument("--links", action="store_true",
                   help="latency and bandwidth between every pair of ranks (within a host, across hosts)")
    b.add_argument("--hosts", default=None, help="with --links: engines on these hosts, e.g. hosta:2,hostb:2 (over ssh)")
    b.add_argument("--cell-overhead", action="store_true",
                   help="a strategy cell's client time beyond the engines' own, on a loaded model")
    b.add_argument("--dashboard-overhead", action="store_true", help="generation with the dashboard and live text on and off")
    b.add_argument("--soak", type=int, default=0, metavar="N", help="N generation cells in a row: failures, memory growth")


def main(argv: list[str] | None = None) -> int:
    from .errors import MpbookError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MpbookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
