"""What an engine measures about itself: phase, tokens, collectives, timeline, memory.

One :class:`Telemetry` per engine (on its EngineState). Strategies report into it; a
snapshot holds *running totals* since the engine started, never increments, because
ipyparallel's client merges each published snapshot into the last one by key
(``md['data'].update(data)``): a lost or repeated message then costs nothing.

A run (one generate or forward call) is bracketed by :meth:`Telemetry.run`, which yields
a :class:`RunStats` with that run's own counts for the result object.

Strategies only report; they never publish. While a task runs on the engine,
:mod:`mpbook.engine.publish` sends :meth:`Telemetry.snapshot` to the client a few times a second
from a background thread, so everything here must be cheap and safe to read from that thread
(reads copy dicts whole, which the GIL makes atomic).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..protocol import MEMORY_PARTS, PHASES, Event


@dataclass
class RunStats:
    """Counts of one run on one rank."""

    started: float = field(default_factory=time.perf_counter)
    wall_started: float = field(default_factory=time.time)
    collectives: Counter = field(default_factory=Counter)
    collective_seconds: float = 0.0
    events: list[Event] = field(default_factory=list)
    phase_seconds: Counter = field(default_factory=Counter)
    peak_memory_bytes: int = 0
    expert_tokens_at_start: int = 0  # the engine's running total when the run began
    expert_tokens_at_end: int | None = None  # ... and when it ended
    number: int = 0  # this engine's runs, counted from 1
    stream: Any = field(default=None, repr=False)  # the run's live tokens (engine.stream), on a choosing rank
    telemetry: Any = field(default=None, repr=False)

    @property
    def expert_tokens(self) -> int:
        """Routes (token, expert) that reached this rank's experts during the run (expert parallel)."""
        if self.telemetry is None:
            return 0
        end = self.expert_tokens_at_end if self.expert_tokens_at_end is not None else self.telemetry.expert_tokens
        return end - self.expert_tokens_at_start


class Telemetry:
    def __init__(self, rank: int, device: Any):
        self.rank = rank
        self.device = device
        self.host = socket.gethostname()
        self.phase = "idle"
        self.tokens: Counter = Counter()  # phase -> tokens processed (running total)
        self.phase_seconds: Counter = Counter()  # phase -> seconds spent (running total)
        self.collectives: Counter = Counter()  # kind -> count (running total)
        self.collective_seconds = 0.0
        self.collective_seconds_by_kind: Counter = Counter()  # kind -> seconds (running total)
        # The same collectives on the host's clock: on a GPU the time to queue them (what a
        # decode step's host-side breakdown, mpbook.engine.steps, subtracts); on a CPU the same
        # as collective_seconds_by_kind.
        self.host_collective_seconds_by_kind: Counter = Counter()
        # GPU collectives timed by CUDA events, waiting for the device to pass the end event:
        # (kind, start, end, the run they belong to). Settled in order (settle_collectives).
        self._timing: list[tuple[str, Any, Any, RunStats | None]] = []
        self._timing_lock = threading.Lock()  # the run's thread and the publisher's both settle
        self.memory_parts: dict[str, int] = {}  # part -> bytes, as last noted by a strategy
        # Routes (token, expert) that reached this rank's experts (expert parallel): ints, and
        # per device a 0-d tensor the MoE layers add to in place (expert_counter), read only
        # when asked (no host sync in the layer).
        self._expert_tokens = 0
        self._expert_counters: dict[str, Any] = {}
        self._expert_lock = threading.Lock()  # the publisher thread and the run both read the total
        # Ranks with the same replica work on the same tokens (one data-parallel replica:
        # its pipeline stages and tensor shards); the dashboard counts their tokens once.
        # Each rank is its own replica until a strategy says otherwise.
        self.replica = rank
        # The live tokens of the run in progress, on the rank that chooses them (engine.stream).
        self._stream = None
        self.runs = 0  # runs begun on this engine
        self._run: RunStats | None = None
        self._last_run: RunStats | None = None
        # CPU: whether the kernel's peak of this process's resident memory could be reset
        # (None: not tried yet); where it cannot, the peak is the highest RSS sampled since.
        self._peak_resettable: bool | None = None
        self._sampled_peak = 0
        self._phase_started = time.perf_counter()
        self._nvml = None  # NVML handle of this engine's GPU, opened on first use
        self._process = None  # psutil.Process of this engine, made on first use

    # ---------------------------------------------------------------- reporting
    @contextmanager
    def run(self) -> Iterator[RunStats]:
        """Bracket one generate/forward call; the stats cover that call alone (its memory peak
        too: the peak is reset as it begins)."""
        self.runs += 1
        self.reset_peak()
        # The time in the phase before the run (idle since the last call, the model's loading)
        # goes to the engine's totals, not to this run's phases.
        self.set_phase(self.phase)
        stats = self._run = RunStats(expert_tokens_at_start=self.expert_tokens, number=self.runs, telemetry=self)
        try:
            yield stats
            self.settle_collectives(wait=True)  # the run's collectives all in its time (a GPU's)
        finally:
            self.settle_collectives(give_up=True)  # after a failure the device may never get there
            self.set_phase("idle")
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, self.peak_memory_bytes())
            stats.expert_tokens_at_end = self.expert_tokens
            # Kept for the snapshots after the run: the final one carries its last tokens (a
            # replica that finishes before the others shows all of its text at once).
            self._last_run, self._run = stats, None

    @property
    def stream(self):
        """The live tokens (:class:`mpbook.engine.stream.TokenStream`) of the run in progress."""
        return self._stream

    @stream.setter
    def stream(self, value) -> None:
        self._stream = value
        if value is not None and self._run is not None:
            self._run.stream = value

    def _stream_figure(self) -> dict | None:
        """The ``stream`` of a snapshot: the tokens of the run in progress, else of the last
        run, numbered by run so that the client can tell one run's tokens from another's."""
        stats = self._run if self._run is not None else self._last_run
        if stats is None or stats.stream is None:
            return None
        return {**stats.stream.snapshot(), "run": stats.number}

    @contextmanager
    def phase_scope(self, phase: str) -> Iterator[None]:
        previous = self.phase
        self.set_phase(phase)
        try:
            yield
        finally:
            self.set_phase(previous)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        now = time.perf_counter()
        spent = now - self._phase_started
        self.phase_seconds[self.phase] += spent
        if self._run is not None:
            self._run.phase_seconds[self.phase] += spent
            in_use = self.memory_in_use_bytes()
            self._sampled_peak = max(self._sampled_peak, in_use)
            self._run.peak_memory_bytes = max(self._run.peak_memory_bytes, in_use)
        self.phase, self._phase_started = phase, now

    def add_tokens(self, phase: str, n: int) -> None:
        self.tokens[phase] += n

    def expert_counter(self, device):
        """The 0-d int64 tensor on ``device`` that MoE layers add their routes to, in place.

        A layer gets it once, when its dispatch is installed, and adds to it in every forward:
        no host sync there, and inside a compiled step one tensor mutated in place, which the
        graph's guards check as one tensor. (Counts appended to a list made every compiled step
        guard on the list's length, so each cell compiled again, and a snapshot that emptied
        the list while a step was being compiled broke the compile.)"""
        import torch

        with self._expert_lock:
            key = str(device)
            if key not in self._expert_counters:
                self._expert_counters[key] = torch.zeros((), dtype=torch.long, device=device)
            return self._expert_counters[key]

    def expert_counters(self) -> list:
        """Every device's routes counter (:meth:`expert_counter`) made so far."""
        with self._expert_lock:
            return list(self._expert_counters.values())

    def add_expert_tokens(self, n) -> None:
        """Count ``n`` routes (token, expert) that reached this rank's experts; ``n`` may be an
        int or a 0-d tensor on the device (read when a snapshot or the run's stats ask)."""
        if isinstance(n, int):
            with self._expert_lock:
                self._expert_tokens += n
        else:
            self.expert_counter(n.device).add_(n)

    @property
    def expert_tokens(self) -> int:
        with self._expert_lock:
            return self._expert_tokens + sum(int(counter) for counter in self._expert_counters.values())

    def collective(self, kind: str, seconds: float = 0.0, n: int = 1) -> None:
        """Count ``n`` collectives of ``kind`` (all_reduce, all_gather, send, recv, ...) that
        took ``seconds`` on the host's clock.

        ``n=0`` adds time alone (waiting for sends already counted) and no count of 0."""
        with self._timing_lock:
            self._count(kind, seconds, n, self._run)
            self.host_collective_seconds_by_kind[kind] += seconds

    def _count(self, kind: str, seconds: float, n: int, run: RunStats | None) -> None:
        if n:
            self.collectives[kind] += n
        self.collective_seconds += seconds
        self.collective_seconds_by_kind[kind] += seconds
        if run is not None:
            if n:
                run.collectives[kind] += n
            run.collective_seconds += seconds

    @contextmanager
    def timed_collective(self, kind: str) -> Iterator[None]:
        """Count one collective of ``kind`` and time it.

        On a CPU the host's clock times it: the call returns when the collective has finished.
        A GPU's collectives (NCCL) are asynchronous: the call returns once the work is queued,
        so the host's clock would time the launch. There, as the step clock does
        (:class:`mpbook.engine.decode.StepClock`), CUDA events recorded on the device's
        current stream before and after time the device's work, the wait for the other ranks
        included (the stream waits for the collective); the time is added once the device has
        passed the end event (:meth:`settle_collectives`)."""
        if self.device.type != "cuda":
            began = time.perf_counter()
            try:
                yield
            finally:
                self.collective(kind, time.perf_counter() - began)
            return
        import torch

        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        began = time.perf_counter()
        try:
            yield
        finally:
            end.record(stream)
            with self._timing_lock:
                self._count(kind, 0.0, 1, self._run)  # counted now, its time once the device says
                self.host_collective_seconds_by_kind[kind] += time.perf_counter() - began
                self._timing.append((kind, start, end, self._run))
            self.settle_collectives(wait=False)

    def settle_collectives(self, *, wait: bool = False, give_up: bool = False) -> None:
        """Add the device time of the GPU collectives whose end the device has passed, in the
        order they were queued; ``wait``: all of them, waiting for the device; ``give_up``:
        forget those it has not passed (a failed run: their count stays, their time is lost)."""
        with self._timing_lock:
            while self._timing:
                kind, start, end, run = self._timing[0]
                if wait:
                    end.synchronize()
                elif not end.query():
                    break
                self._timing.pop(0)
                self._count(kind, start.elapsed_time(end) / 1000, 0, run)
            if give_up:
                self._timing.clear()

    def event(self, stage: int, microbatch: int, phase: str, start: float, end: float) -> None:
        """Record a timeline bar; ``start``/``end`` are perf_counter readings."""
        if self._run is not None:
            t0 = self._run.started
            self._run.events.append(
                Event(self.rank, stage, microbatch, phase, start - t0, end - t0, self._run.wall_started)
            )

    def note_memory(self, part: str, nbytes: int) -> None:
        """Say how many bytes of this rank's memory hold ``part`` (weights, kv_cache, activations)."""
        if part not in MEMORY_PARTS:
            raise ValueError(f"unknown memory part {part!r}; one of {MEMORY_PARTS}")
        self.memory_parts = {**self.memory_parts, part: int(nbytes)}  # replaced whole: the publisher reads it

    # ---------------------------------------------------------------- memory
    def memory_in_use_bytes(self) -> int:
        """CUDA: bytes allocated by torch's caching allocator; CPU: the process's RSS."""
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        if self._process is None:
            import psutil

            self._process = psutil.Process(os.getpid())
        return int(self._process.memory_info().rss)

    def reset_peak(self) -> None:
        """Start the memory peak afresh (a task or a run begins): CUDA, torch's peak
        allocated; CPU, the kernel's peak RSS of this process (Linux's ``clear_refs``), or
        where that cannot be reset, the highest RSS sampled from now on."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._peak_resettable is not False:
            try:
                # "5" resets the peak resident set size (VmHWM, and with it ru_maxrss) to
                # the current one (Linux >= 4.0, proc(5)); the process may write its own.
                with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
                    f.write("5")
                self._peak_resettable = True
            except OSError:
                self._peak_resettable = False
        self._sampled_peak = self.memory_in_use_bytes()

    def peak_memory_bytes(self, in_use: int | None = None) -> int:
        """The peak since the current task or run began (:meth:`reset_peak`). CUDA: peak
        allocated by torch; CPU: the process's peak RSS (the Python runtime included)."""
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        in_use = self.memory_in_use_bytes() if in_use is None else in_use
        self._sampled_peak = max(self._sampled_peak, in_use)
        if self._peak_resettable is False:
            return self._sampled_peak
        return max(_peak_rss(), in_use)

    def memory(self) -> dict[str, int | None]:
        """Memory figures for the dashboard; ``None`` where this device has no such figure.

        ``reserved``: held by torch's CUDA cache (allocated plus cached free blocks).
        ``device_used``/``device_total``: the whole device, other processes included: the GPU
        as NVML sees it (torch's ``mem_get_info`` where NVML cannot say), or on a CPU engine
        the host's memory, the capacity that the process's figure is measured against.
        """
        in_use = self.memory_in_use_bytes()
        figures: dict[str, int | None] = {
            "in_use": in_use,
            "peak": self.peak_memory_bytes(in_use),
            "reserved": None,
            "device_used": None,
            "device_total": None,
        }
        if self.device.type == "cuda":
            import torch

            figures["reserved"] = int(torch.cuda.memory_reserved(self.device))
            info = self._nvml_memory()
            if info is not None:
                figures["device_used"], figures["device_total"] = int(info.used), int(info.total)
            else:
                free, total = device_memory(self.device)
                figures["device_used"], figures["device_total"] = total - free, total
        else:
            free, total = device_memory(self.device)  # reads /proc/meminfo: cheap enough four times a second
            figures["device_used"], figures["device_total"] = total - free, total
        return figures

    def _nvml_memory(self):
        """NVML's memory info for this engine's GPU, or None when NVML cannot say."""
        if self._nvml is None:
            self._nvml = _nvml_handle(self.device) or False
        if self._nvml is False:
            return None
        import pynvml

        try:
            return pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
        except pynvml.NVMLError:
            return None

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> dict[str, Any]:
        """Running totals for the dashboard (one dict, replaced whole on the client)."""
        self.settle_collectives(wait=False)
        now = time.perf_counter()
        phase_seconds = Counter(self.phase_seconds)
        phase_seconds[self.phase] += now - self._phase_started
        memory = self.memory()
        return {
            "rank": self.rank,
            "host": self.host,
            "device": str(self.device),
            "phase": self.phase,
            "time": time.time(),
            "tokens": dict(self.tokens),
            "phase_seconds": dict(phase_seconds),
            "collectives": dict(self.collectives),
            "collective_seconds": self.collective_seconds,
            "collective_seconds_by_kind": dict(self.collective_seconds_by_kind),
            "memory": memory,
            "memory_parts": self.memory_parts,
            "memory_in_use_bytes": memory["in_use"],
            "peak_memory_bytes": memory["peak"],
            "replica": self.replica,
            "expert_tokens": self.expert_tokens,
            **({"stream": stream} if (stream := self._stream_figure()) is not None else {}),
        }


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of ``device`` now: a GPU's as CUDA reports them (other processes
    included); a CPU engine's, the host's available and total memory."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
    else:
        import psutil

        host = psutil.virtual_memory()
        free, total = host.available, host.total
    return int(free), int(total)


def _peak_rss() -> int:
    """This process's peak resident memory: Linux's VmHWM (which ``clear_refs`` resets), else
    ``ru_maxrss`` (on Linux that also counts the process this one was started from)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))


def _nvml_handle(device: Any):
    """The NVML handle of a torch CUDA device, matched by UUID.

    NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so ``cuda:0`` is not
    NVML's device 0 in general; the UUID names the same GPU in both.
    """
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:
        return None
