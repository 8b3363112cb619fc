"""The links between ranks, measured: latency and bandwidth of every pair, over the process
group the strategies use (``python -m mpbook bench --links``, ``%mp status --links``).

One pair at a time, the others waiting at a barrier, so that no two transfers share a link:
the lower rank sends a small tensor and the higher sends it back (latency: half the median
round trip), then the lower sends a large one and the higher answers with a small one
(bandwidth: bytes over the median time of that exchange). Pairs on one host and pairs across
hosts are summarised apart: what a tensor-parallel all-reduce pays inside a host, and what
a pipeline's activations pay between hosts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

SMALL_ELEMENTS = 2  # 8 bytes of float32: the latency probe
LARGE_BYTES = 4 * 2**20  # the bandwidth probe


@dataclass(frozen=True)
class Link:
    low: int  # ranks, low < high
    high: int
    low_host: str
    high_host: str
    latency_s: float  # one way: half the median round trip of a small message
    bandwidth_bytes_per_s: float  # LARGE_BYTES over the median time to send them and hear back

    @property
    def across_hosts(self) -> bool:
        return self.low_host != self.high_host


def measure_pairs(state, hosts: list[str], round_trips: int, repeats: int) -> list[tuple]:
    """On every engine: take part in each pair's measurement; the lower rank of a pair
    returns its figures (rank, rank, latency, bandwidth)."""
    import torch
    import torch.distributed as dist

    rank, world = state.rank, state.world_size
    small = torch.zeros(SMALL_ELEMENTS)
    large = torch.zeros(LARGE_BYTES // 4)
    mine = []
    for low in range(world):
        for high in range(low + 1, world):
            dist.barrier()  # one pair on the links at a time
            if rank not in (low, high):
                continue
            peer = high if rank == low else low
            times = []
            for _ in range(round_trips + 1):  # the first one sets the connection up
                began = time.perf_counter()
                if rank == low:
                    dist.send(small, peer)
                    dist.recv(small, peer)
                else:
                    dist.recv(small, peer)
                    dist.send(small, peer)
                times.append(time.perf_counter() - began)
            latency = statistics.median(times[1:]) / 2
            spans = []
            for _ in range(repeats + 1):
                began = time.perf_counter()
                if rank == low:
                    dist.send(large, peer)
                    dist.recv(small, peer)
                else:
                    dist.recv(large, peer)
                    dist.send(small, peer)
                spans.append(time.perf_counter() - began)
            if rank == low:
                # the answer's own latency is not the large message's
                span = max(statistics.median(spans[1:]) - latency, 1e-9)
                mine.append((low, high, latency, LARGE_BYTES / span))
    dist.barrier()
    return mine


def measure_links(wb, *, round_trips: int = 20, repeats: int = 5) -> list[Link]:
    """Every pair of ``wb``'s ranks, measured (a few seconds; the engines do nothing else)."""
    hosts = [e.host for e in wb.engines]
    rows = wb.apply(measure_pairs, hosts, round_trips, repeats, stream=False, what="measuring the links")
    links = [Link(low, high, hosts[low], hosts[high], latency, bandwidth)
             for per_rank in rows for low, high, latency, bandwidth in per_rank]
    links.sort(key=lambda link: (link.low, link.high))
    wb.cluster.links = links
    return links


def format_links(links: list[Link]) -> str:
    from .units import format_bytes

    rows = [("ranks", "hosts", "latency", "bandwidth")]
    for link in links:
        hosts = link.low_host if not link.across_hosts else f"{link.low_host} - {link.high_host}"
        rows.append((f"{link.low} - {link.high}", hosts, f"{link.latency_s * 1e3:.3f} ms",
                     f"{format_bytes(link.bandwidth_bytes_per_s)}/s"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([*table, summary(links)])


def summary(links: list[Link]) -> str:
    """One line: median latency and bandwidth within a host and across hosts."""
    from .units import format_bytes

    parts = []
    for label, chosen in (("within a host", [x for x in links if not x.across_hosts]),
                          ("across hosts", [x for x in links if x.across_hosts])):
        if chosen:
            latency = statistics.median(x.latency_s for x in chosen)
            bandwidth = statistics.median(x.bandwidth_bytes_per_s for x in chosen)
            parts.append(f"{label} {latency * 1e3:.3f} ms, {format_bytes(bandwidth)}/s "
                         f"({len(chosen)} pair{'s' if len(chosen) != 1 else ''})")
    return "links (median): " + ("; ".join(parts) if parts else "one rank, no links")
