"""Soak: the same cell many times over, watching for failures and for memory that creeps up.

A notebook session runs for hours; a leak of a few MB per cell, or a failure one cell in a
hundred, shows up only under repetition. :func:`soak` runs one cell (any ``%%mp`` cell: an
all_reduce now, a generation later) through a real IPython shell, and reads the resident
memory of the cluster's processes once the warm-up cells are done and again at the end.

    >>> pids = [e.pid for e in wb.engines]
    >>> report = soak(shell, "%%mp run\\nt = torch.ones(1)\\ndist.all_reduce(t)", pids, cells=50)
    >>> report.max_growth() < 0.05
    True
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SoakReport:
    cell: str
    cells: int
    warmup: int
    seconds: list[float] = field(default_factory=list)  # wall time of each cell
    rss_after_warmup: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    rss_end: dict[int, int] = field(default_factory=dict)
    failure: str | None = None  # the first failed cell's error, if any

    def growth(self) -> dict[int, float]:
        """pid -> relative growth of resident memory from the end of warm-up to the end."""
        return {
            pid: (self.rss_end[pid] - before) / before
            for pid, before in self.rss_after_warmup.items()
            if pid in self.rss_end and before > 0
        }

    def max_growth(self) -> float:
        return max(self.growth().values(), default=0.0)

    def summary(self) -> str:
        from .units import format_bytes

        rows = [
            f"pid {pid}: {format_bytes(self.rss_after_warmup[pid], unit='MiB')} -> "
            f"{format_bytes(self.rss_end[pid], unit='MiB')} ({g:+.2%})"
            for pid, g in sorted(self.growth().items())
        ]
        done = len(self.seconds)
        status = f"failed at cell {done}: {self.failure}" if self.failure else "no failure"
        per_cell = sorted(self.seconds)[len(self.seconds) // 2] * 1e3 if self.seconds else float("nan")
        return f"{done}/{self.cells} cells, {status}, median {per_cell:.1f} ms per cell; " + "; ".join(rows)


def rss(pids: Sequence[int]) -> dict[int, int]:
    """Resident memory of each process that still runs, in bytes."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def soak(shell, cell: str, pids: Sequence[int], *, cells: int = 50, warmup: int = 10) -> SoakReport:
    """Run ``cell`` (a whole cell, ``%%mp`` line included) ``cells`` times in ``shell``.

    Stops at the first failed cell (its error is in the report). Memory is read after
    ``warmup`` cells, when caches, allocator pools and lazily made connections have settled,
    and after the last one.
    """
    if not 0 <= warmup < cells:
        raise ValueError(f"warmup={warmup}, cells={cells}: warm up with fewer cells than the soak runs")
    report = SoakReport(cell=cell, cells=cells, warmup=warmup)
    for i in range(cells):
        if i == warmup:
            gc.collect()
            report.rss_after_warmup = rss(pids)
        began = time.perf_counter()
        result = shell.run_cell(cell, store_history=False, silent=False)
        report.seconds.append(time.perf_counter() - began)
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            report.failure = f"{type(error).__name__}: {error}"
            break
    report.rss_end = rss(pids)
    return report
