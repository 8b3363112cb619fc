"""``python -m mpbook demo`` and ``python -m mpbook bench``."""

from __future__ import annotations

import argparse
import sys
import time


def demo(args: argparse.Namespace) -> int:
    from .workbench import Workbench

    began = time.perf_counter()
    with Workbench.start(args.n, cpu=args.cpu) as wb:
        print(f"started {wb.world_size} engines in {time.perf_counter() - began:.1f} s")
        print(wb.table())
        print("\nall_reduce of each rank's (rank + 1) across the process group:")
        code = "t = torch.tensor([rank + 1.0], device=device)\ndist.all_reduce(t)\nprint(f'sum = {t.item():g}')"
        # Outside a notebook the dashboard prints as text (quiet for a call this short).
        wb.run(code, dashboard=True)
    print("stopped the cluster")
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import dashboard_overhead
    from .errors import MpbookError
    from .workbench import Workbench

    if not args.dashboard_overhead:
        raise MpbookError("bench: choose what to measure, e.g. `python -m mpbook bench --dashboard-overhead`")
    if args.rounds < 1 or args.seconds <= 0:
        raise MpbookError(f"--rounds {args.rounds} --seconds {args.seconds:g}: use at least 1 round of more than 0 s")
    with Workbench.start(args.n, cpu=args.cpu) as wb:
        print(f"{wb.world_size} engines on {wb.device_type}")
        print(dashboard_overhead(wb, rounds=args.rounds, seconds=args.seconds).format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpbook", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="start engines, run the strategies on a tiny model, stop")
    d.add_argument("-n", type=int, default=None, help="engines (default: one per GPU, else 2 CPU engines)")
    d.add_argument("--cpu", action="store_true", help="CPU engines even if GPUs are visible")
    d.set_defaults(func=demo)
    b = commands.add_parser("bench", help="benchmarks, measured side by side in one run")
    b.add_argument("--dashboard-overhead", action="store_true", help="the same workload with the dashboard on and off")
    b.add_argument("-n", type=int, default=None, help="engines (default: one per GPU, else 2 CPU engines)")
    b.add_argument("--cpu", action="store_true", help="CPU engines even if GPUs are visible")
    b.add_argument("--rounds", type=int, default=6, help="A B B A rounds (default 6)")
    b.add_argument("--seconds", type=float, default=1.5, help="about how long one run lasts (default 1.5)")
    b.set_defaults(func=bench)
    return parser


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
