"""Where each rank runs and how much memory it may take: given sizes, the engines, or this machine.

This machine is asked through mpbook.devices (NVML and the OS), never through CUDA: the
notebook kernel must not create a CUDA context before the engines take the GPUs.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .. import devices as machine
from ..errors import MpbookError


@dataclass(frozen=True)
class Device:
    """Where a rank runs and how much memory it may take."""

    name: str  # "cuda:0", "cpu", or "given"
    host: str
    free_bytes: int
    shared: bool = False  # CPU engines on one host draw on one pool of memory
    # The links between this rank and the others, where they were measured
    # (mpbook.bench_links.Link rows: `%mp status --links`, Workbench.measure_links).
    links: tuple = ()


def engine_count(engines) -> int | None:
    """``engines`` as a number: a count, a Workbench's world size, or None when not given."""
    if engines is None:
        return None
    if isinstance(engines, bool) or not (isinstance(engines, int) or hasattr(engines, "world_size")):
        raise MpbookError(f"engines={engines!r}: give a number of engines or a Workbench")
    n = engines if isinstance(engines, int) else engines.world_size
    if n < 1:
        raise MpbookError(f"engines={n}: need at least 1 engine")
    return n


def devices_for(engines, device_memory_bytes: int | Sequence[int] | None, world: int) -> tuple[list[Device], str]:
    """Each rank's device and its free memory (given, asked of the engines, or of this
    machine), and a few words saying which."""
    if device_memory_bytes is not None:
        return given_sizes(device_memory_bytes, world), "as given"
    if engines is not None and hasattr(engines, "status"):
        measured = getattr(getattr(engines, "cluster", None), "links", None) or ()
        return [
            Device(i.device, i.host, i.memory_free_bytes, shared=not i.device.startswith("cuda"),
                   links=tuple(x for x in measured if i.rank in (x.low, x.high)))
            for i in engines.status()
        ], "free memory reported by the engines"
    return this_machine(world)


def given_sizes(device_memory_bytes: int | Sequence[int], world: int) -> list[Device]:
    """One size for every rank, or one per rank."""
    if isinstance(device_memory_bytes, (int, float)) and not isinstance(device_memory_bytes, bool):
        sizes = [int(device_memory_bytes)] * world
    else:
        sizes = [int(b) for b in device_memory_bytes]
        if len(sizes) != world:
            raise MpbookError(
                f"device_memory_bytes lists {len(sizes)} sizes for {world} ranks; give one size, or one per rank"
            )
    if any(b <= 0 for b in sizes):
        raise MpbookError(f"device_memory_bytes={device_memory_bytes!r}: sizes must be positive byte counts")
    return [Device("given", f"rank {r}", b) for r, b in enumerate(sizes)]


def this_machine(world: int) -> tuple[list[Device], str]:
    """One GPU per rank when enough are visible; else the host's available memory, which
    CPU engines share."""
    host = socket.gethostname()
    gpus = machine.visible_gpu_count()
    if gpus >= world:
        free = machine.gpu_free_bytes(world)
        return [Device(f"cuda:{r}", host, b) for r, b in enumerate(free)], "free GPU memory on this machine (NVML)"
    import psutil

    available = int(psutil.virtual_memory().available)
    how = "available host memory on this machine, shared by CPU engines"
    if gpus:
        how += f" ({gpus} GPU{'s' if gpus > 1 else ''} visible, fewer than {world} ranks)"
    return [Device("cpu", host, available, shared=True) for _ in range(world)], how
