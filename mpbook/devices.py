"""What this machine offers the engines: visible GPUs, usable cores, and the start plan.

Asked of NVML and the OS, never of CUDA: the notebook kernel must not create a CUDA context
before the engines (separate processes) take the GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import MpbookError

DEFAULT_CPU_ENGINES = 2


def visible_gpu_count() -> int:
    """GPUs this process may use, asked of NVML so that no CUDA context is created here."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        count = min(count, len(listed))
    return count


def gpu_free_bytes(count: int) -> list[int]:
    """Free memory of the first ``count`` visible GPUs, in CUDA's order (NVML numbers GPUs
    physically, so CUDA_VISIBLE_DEVICES is followed by index or UUID)."""
    import pynvml

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    pynvml.nvmlInit()
    try:
        out = []
        for ident in ids[:count]:
            handle = (
                pynvml.nvmlDeviceGetHandleByIndex(int(ident)) if ident.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(ident)
            )
            out.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
        return out
    finally:
        pynvml.nvmlShutdown()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineSpec:
    """The engines to start: how many, on GPUs or CPU, with how many threads each; decided before anything starts."""

    n: int
    use_gpu: bool
    threads: int

    @classmethod
    def choose(cls, n: int | None = None, *, cpu: bool = False, gpu: bool = False, gpus: int | None = None) -> EngineSpec:
        """``gpus``: how many GPUs are visible (asked of NVML when not given)."""
        from .options import check_engine_count

        if cpu and gpu:
            raise MpbookError("--cpu and --gpu contradict each other: choose one")
        if n is not None:
            n = check_engine_count(n)
        if cpu:
            gpus = 0
        elif gpus is None:
            gpus = visible_gpu_count()
        if gpu and gpus == 0:
            raise MpbookError("--gpu: no CUDA GPU is visible here; leave out --gpu to start CPU engines")
        if gpus:
            n = gpus if n is None else n
            if n > gpus:
                raise MpbookError(
                    f"-n {n}: one engine per GPU and {gpus} GPU{'s are' if gpus > 1 else ' is'} visible; "
                    f"use -n {gpus} or fewer, or --cpu for {n} CPU engines"
                )
            return cls(n=n, use_gpu=True, threads=max(1, usable_cores() // n))
        n = DEFAULT_CPU_ENGINES if n is None else n
        most = max(8, 4 * usable_cores())
        if n > most:
            raise MpbookError(
                f"-n {n}: {usable_cores()} cores cannot run that many CPU engines (each a process holding its "
                f"own part of the model); use -n {most} or fewer"
            )
        # Engines inherit the kernel's environment; without a share each would start one
        # thread per core and together they would oversubscribe the CPU.
        return cls(n=n, use_gpu=False, threads=max(1, usable_cores() // n))
