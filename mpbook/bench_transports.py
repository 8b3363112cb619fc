"""``python -m mpbook bench --collectives``: what one collective costs on each transport.

On one cluster whose engines share an MPI world, every transport mpbook can use between them
is timed side by side in one run (these machines are noisy): all-reduce of float32 tensors
from 4 KiB to 4 MiB (8 KiB: a decode step's all-reduce of 8 rows of a 256-wide model), and a send/recv round trip (ping-pong, halved) of 4 KiB, through the
same code the model's layers call (:class:`mpbook.parallel.collectives.Group`), once over
the process group's backend and once over MPI. Times are per call on rank 0: median and
90th percentile of ``repeats`` calls, after ``warmup``.

All-reduce is timed two ways. **After a barrier**: every call starts from the transport's
barrier, so its time holds how late the peer leaves the barrier (a cold call). **Back to
back**: one barrier, then the calls one after another, each timed, as a layer's all-reduces
follow each other in a decode step and as MPI's own latency benchmarks run them.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZES = (4 << 10, 8 << 10, 64 << 10, 1 << 20, 4 << 20)
PING_BYTES = 4 << 10


@dataclass(frozen=True)
class Timing:
    transport: str
    operation: str  # "all_reduce", "all_reduce back to back" or "send/recv"
    nbytes: int
    median_us: float
    p90_us: float


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """Median and 90th percentile, in microseconds (mpbook's one percentile)."""
    from .results import percentile

    return percentile(seconds, 50) * 1e6, percentile(seconds, 90) * 1e6


def measure_on_engine(state, *, repeats: int, warmup: int) -> list[dict]:
    """Every transport this engine has, timed (runs on every rank at once)."""
    import time

    import torch
    import torch.distributed as dist

    from .parallel.collectives import Group

    size = state.world_size
    ranks = list(range(size))
    transports = [("mpi", state.mpi)] if state.mpi is not None else []
    transports.append((state.backend, None))
    out = []
    # MPI first: in these processes a gloo send/recv was seen to slow MPI's collectives
    # afterwards (all-reduce 10 -> 150 us at 4 KiB), which mpbook's own runs never do (with MPI
    # up, every one of their collectives and sends is MPI's).
    for name, comm in transports:
        group = Group(None, rank=state.rank, size=size, ranks=ranks, comm=comm)
        for nbytes in SIZES:
            tensor = torch.ones(nbytes // 4)
            times = []
            for i in range(warmup + repeats):
                # Every rank starts the call together (the transport's own barrier, whose ranks
                # leave it within its own latency): the cost of the call, not a late peer.
                comm.comm.Barrier() if comm is not None else dist.barrier()
                began = time.perf_counter()
                group.all_reduce(tensor)
                if i >= warmup:
                    times.append(time.perf_counter() - began)
            out.append(dict(transport=name, operation="all_reduce", nbytes=nbytes, seconds=times))
            comm.comm.Barrier() if comm is not None else dist.barrier()
            times = []
            for i in range(warmup + repeats):
                began = time.perf_counter()
                group.all_reduce(tensor)
                if i >= warmup:
                    times.append(time.perf_counter() - began)
            out.append(dict(transport=name, operation="all_reduce back to back", nbytes=nbytes, seconds=times))
        if size >= 2 and state.rank in (0, 1):
            out.append(dict(transport=name, operation="send/recv", nbytes=PING_BYTES,
                            seconds=_ping_pong(state.rank, comm, repeats=repeats, warmup=warmup)))
    return out


def _ping_pong(rank: int, comm, *, repeats: int, warmup: int) -> list[float]:
    """Rank 0 sends PING_BYTES to rank 1 and waits for them back; half the round trip."""
    import time

    import torch
    import torch.distributed as dist

    buffer = torch.zeros(PING_BYTES // 4)
    other = 1 - rank

    def send():
        if comm is not None:
            comm.wait(comm.isend(buffer, other, 0))
        else:
            dist.send(buffer, dst=other)

    def recv():
        if comm is not None:
            comm.recv(buffer, other, 0)
        else:
            dist.recv(buffer, src=other)

    times = []
    for i in range(warmup + repeats):
        began = time.perf_counter()
        if rank == 0:
            send()
            recv()
        else:
            recv()
            send()
        if i >= warmup:
            times.append((time.perf_counter() - began) / 2)
    return times


def bench_collectives(*, engines: int = 2, repeats: int = 500, warmup: int = 50) -> list[Timing]:
    """Start ``engines`` CPU engines (MPI when installed) and time every transport."""
    from .workbench import Workbench

    with Workbench.start(engines, cpu=True) as wb:
        print(wb.table())
        per_rank = wb.apply(measure_on_engine, repeats=repeats, warmup=warmup, stream=False)
    timings = []
    for record in per_rank[0]:
        median, p90 = _percentiles(record["seconds"])
        timings.append(Timing(record["transport"], record["operation"], record["nbytes"], median, p90))
    return timings


def format_timings(timings: list[Timing], engines: int) -> str:
    from .units import format_bytes

    rows = [("operation", "size", "transport", "median", "p90", "vs gloo")]
    gloo = {(t.operation, t.nbytes): t.median_us for t in timings if t.transport == "gloo"}
    for t in sorted(timings, key=lambda t: (t.operation, t.nbytes, t.transport)):
        base = gloo.get((t.operation, t.nbytes))
        ratio = f"{base / t.median_us:.0f}x faster" if base and t.transport != "gloo" else ""
        rows.append((t.operation, format_bytes(t.nbytes), t.transport, f"{t.median_us:,.1f} us", f"{t.p90_us:,.1f} us",
                     ratio))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"collectives between {engines} CPU engines on one host (rank 0's time per call)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
