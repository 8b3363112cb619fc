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
        wb.run("t = torch.tensor([rank + 1.0], device=device)\ndist.all_reduce(t)\nprint(f'sum = {t.item():g}')")
    print("stopped the cluster")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpbook", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="start engines, run the strategies on a tiny model, stop")
    d.add_argument("-n", type=int, default=None, help="engines (default: one per GPU, else 2 CPU engines)")
    d.add_argument("--cpu", action="store_true", help="CPU engines even if GPUs are visible")
    d.set_defaults(func=demo)
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
