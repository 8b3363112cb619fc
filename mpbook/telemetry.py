"""What an engine measures about itself: phase, tokens, collectives, timeline, memory.

One :class:`Telemetry` per engine (on its EngineState). Strategies report into it; a
snapshot holds *running totals* since the engine started, never increments, because
ipyparallel's client merges each published snapshot into the last one by key
(``md['data'].update(data)``): a lost or repeated message then costs nothing.

A run (one generate or forward call) is bracketed by :meth:`Telemetry.run`, which yields
a :class:`RunStats` with that run's own counts for the result object.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PHASES = ("idle", "loading", "prefill", "decode")


@dataclass(frozen=True)
class Event:
    """One stage working on one micro-batch: a bar of the pipeline timeline."""

    rank: int
    stage: int
    microbatch: int
    phase: str
    start: float  # seconds since the run began
    end: float


@dataclass
class RunStats:
    """Counts of one run on one rank."""

    started: float = field(default_factory=time.perf_counter)
    collectives: Counter = field(default_factory=Counter)
    collective_seconds: float = 0.0
    events: list[Event] = field(default_factory=list)
    phase_seconds: Counter = field(default_factory=Counter)
    peak_memory_bytes: int = 0


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
        self._run: RunStats | None = None
        self._phase_started = time.perf_counter()

    # ---------------------------------------------------------------- reporting
    @contextmanager
    def run(self) -> Iterator[RunStats]:
        """Bracket one generate/forward call; the stats cover that call alone."""
        stats = self._run = RunStats()
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield stats
        finally:
            self.set_phase("idle")
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, self.peak_memory_bytes())
            self._run = None

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
            self._run.peak_memory_bytes = max(self._run.peak_memory_bytes, self.memory_in_use_bytes())
        self.phase, self._phase_started = phase, now

    def add_tokens(self, phase: str, n: int) -> None:
        self.tokens[phase] += n

    def collective(self, kind: str, seconds: float = 0.0, n: int = 1) -> None:
        """Count ``n`` collectives of ``kind`` (all_reduce, all_gather, send, recv, ...)."""
        self.collectives[kind] += n
        self.collective_seconds += seconds
        if self._run is not None:
            self._run.collectives[kind] += n
            self._run.collective_seconds += seconds

    @contextmanager
    def timed_collective(self, kind: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.collective(kind, time.perf_counter() - began)

    def event(self, stage: int, microbatch: int, phase: str, start: float, end: float) -> None:
        """Record a timeline bar; ``start``/``end`` are perf_counter readings."""
        if self._run is not None:
            t0 = self._run.started
            self._run.events.append(Event(self.rank, stage, microbatch, phase, start - t0, end - t0))

    # ---------------------------------------------------------------- memory
    def memory_in_use_bytes(self) -> int:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return self.memory_in_use_bytes()

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> dict[str, Any]:
        """Running totals for the dashboard (one dict, replaced whole on the client)."""
        now = time.perf_counter()
        phase_seconds = Counter(self.phase_seconds)
        phase_seconds[self.phase] += now - self._phase_started
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
            "memory_in_use_bytes": self.memory_in_use_bytes(),
            "peak_memory_bytes": self.peak_memory_bytes(),
        }
