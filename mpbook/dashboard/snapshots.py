"""The dashboard's data model: what the engines' snapshots say about one call (a cell).

Engines publish running totals since they started (:mod:`mpbook.engine.telemetry`), so the
figures of a call are differences: the latest snapshot minus the one taken as the call began
(published under ``TELEMETRY_START``). Nothing here adds up across calls, and nothing here
touches widgets or prints: the views turn these figures into pixels or lines.

Ranks of one data-parallel replica (its pipeline stages and tensor shards) work on the same
tokens, so a replica's tokens count once, from its rank that saw the most; replicas add up.
A phase's seconds are the longest rank's (ranks run at the same time), as in
:func:`mpbook.results.merge`, so that rates here equal the result's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..units import format_bytes

RATE_WINDOW_S = 1.0  # live tokens/s is measured over the last second of snapshots
STALE_AFTER_S = 2.0  # a rank whose snapshots stopped this long ago has a live rate of 0
WORK_PHASES = ("importing", "loading", "compiling", "prefill", "decode")  # in the order a run goes through them
NONE = "–"  # a figure nobody has measured (yet)

Snapshot = Mapping[str, Any]


# --------------------------------------------------------------------------- numbers as text
def format_rate(rate: float | None) -> str:
    """Tokens/s as a grid shows it: ``12.5``, ``15.2k``; ``–`` when unknown."""
    if rate is None:
        return NONE
    return f"{rate / 1000:.1f}k" if rate >= 10_000 else f"{rate:.1f}"


def format_phase_rate(phase: str, rate: float) -> str:
    """A phase's tokens/s with the precision of :meth:`mpbook.results.RunResult.summary`
    (prefill whole numbers, decode one decimal), so both lines read the same digits."""
    return f"{rate:,.0f}" if phase == "prefill" else f"{rate:,.1f}"


def format_memory(n: int | None) -> str:
    return NONE if n is None else format_bytes(n)


def total_tokens(snapshot: Snapshot) -> int:
    return sum(snapshot.get("tokens", {}).values())


# --------------------------------------------------------------------------- one rank, one call
@dataclass(frozen=True)
class CellTotals:
    """One rank's figures for one call: the latest snapshot minus the call's first."""

    tokens: Mapping[str, int]
    phase_seconds: Mapping[str, float]
    collective_seconds: float
    seconds: float  # engine clock, first to latest snapshot
    expert_tokens: int = 0  # routes (token, expert) that reached this rank's experts

    @classmethod
    def between(cls, start: Snapshot, latest: Snapshot) -> CellTotals:
        def delta(key: str) -> dict[str, Any]:
            before = start.get(key, {})
            return {k: v - before.get(k, 0) for k, v in latest.get(key, {}).items() if v - before.get(k, 0) > 0}

        return cls(
            tokens=delta("tokens"),
            phase_seconds=delta("phase_seconds"),
            collective_seconds=max(0.0, latest.get("collective_seconds", 0.0) - start.get("collective_seconds", 0.0)),
            seconds=max(0.0, latest["time"] - start["time"]),
            expert_tokens=max(0, latest.get("expert_tokens", 0) - start.get("expert_tokens", 0)),
        )


EMPTY = CellTotals({}, {}, 0.0, 0.0)


@dataclass
class RankTrack:
    """What the dashboard knows of one rank: the call's first snapshot and its latest."""

    rank: int
    host: str = ""
    device: str = ""
    start: dict[str, Any] | None = None  # the snapshot as the current (or last) call began
    first: dict[str, Any] | None = None  # the first seen since then (when no start came)
    latest: dict[str, Any] | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # (engine time, tokens, collective s)
    outcome: str = ""  # "", "failed"
    received: float = 0.0  # the client's clock when the latest snapshot came in

    def begin(self) -> None:
        """A call starts: its figures start from zero."""
        self.start = self.first = None
        self.outcome = ""
        self.recent.clear()

    def add(self, snapshot: Snapshot, *, start: Snapshot | None = None, now: float) -> None:
        if start is not None and (self.start is None or start["time"] > self.start["time"]):
            self.start = dict(start)
        if self.latest is not None and snapshot["time"] <= self.latest["time"]:
            return  # seen already (the same totals reread on the next tick)
        self.latest = dict(snapshot)
        if self.first is None:
            self.first = self.latest
        self.received = now
        self.host = snapshot.get("host", self.host)
        self.device = snapshot.get("device", self.device)
        t = snapshot["time"]
        self.recent.append((t, total_tokens(snapshot), snapshot.get("collective_seconds", 0.0)))
        while len(self.recent) > 2 and t - self.recent[1][0] >= RATE_WINDOW_S:
            self.recent.popleft()

    @property
    def replica(self) -> Any:
        return (self.latest or {}).get("replica", self.rank)

    def rate(self, now: float) -> float:
        """Tokens/s over the last second of snapshots (0 once the rank has gone quiet).

        Rates use the engine's own clock (differences only); staleness uses the client's,
        as engine clocks on other hosts need not agree with it.
        """
        if len(self.recent) < 2 or now - self.received > STALE_AFTER_S:
            return 0.0
        (t0, n0, _), (t1, n1, _) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def collective_share(self) -> float:
        """Fraction of the last second of snapshots spent in collectives."""
        if len(self.recent) < 2:
            return 0.0
        (t0, _, c0), (t1, _, c1) = self.recent[0], self.recent[-1]
        return min(1.0, max(0.0, (c1 - c0) / (t1 - t0))) if t1 > t0 else 0.0

    def cell(self) -> CellTotals:
        """This rank's figures for the current (or last) call."""
        baseline = self.start or self.first
        if self.latest is None or baseline is None:
            return EMPTY
        return CellTotals.between(baseline, self.latest)


# --------------------------------------------------------------------------- the cluster, one call
@dataclass(frozen=True)
class CellFigures:
    """The cluster's figures for one call, counted as the run's result counts them."""

    tokens: Mapping[str, int]  # phase -> tokens, each replica once
    phase_seconds: Mapping[str, float]  # phase -> the longest rank's seconds
    collective_seconds: Mapping[int, float]  # rank -> seconds in collectives during the call

    def rate(self, phase: str) -> float | None:
        seconds = self.phase_seconds.get(phase, 0.0)
        tokens = self.tokens.get(phase, 0)
        return tokens / seconds if tokens and seconds > 0 else None

    @property
    def main_phase(self) -> str | None:
        """The phase a single tokens/s stands for: the decode once there is one."""
        return "decode" if self.tokens.get("decode") else ("prefill" if self.tokens.get("prefill") else None)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


def cell_figures(tracks: Iterable[RankTrack]) -> CellFigures:
    per_replica: dict[Any, Mapping[str, int]] = {}
    phase_seconds: dict[str, float] = {}
    collectives: dict[int, float] = {}
    for track in tracks:
        if track.latest is None:
            continue
        cell = track.cell()
        collectives[track.rank] = cell.collective_seconds
        for phase, seconds in cell.phase_seconds.items():
            phase_seconds[phase] = max(phase_seconds.get(phase, 0.0), seconds)
        if sum(cell.tokens.values()) > sum(per_replica.get(track.replica, {}).values()):
            per_replica[track.replica] = cell.tokens
    tokens: dict[str, int] = {}
    for counts in per_replica.values():
        for phase, n in counts.items():
            tokens[phase] = tokens.get(phase, 0) + n
    return CellFigures(tokens, phase_seconds, collectives)


def replica_rates(tracks: Sequence[RankTrack], phase: str) -> dict[Any, float]:
    """Each replica's tokens/s in ``phase`` over the call: its tokens over its longest rank's time."""
    by_replica: dict[Any, list[RankTrack]] = {}
    for track in tracks:
        if track.latest is not None:
            by_replica.setdefault(track.replica, []).append(track)
    return {replica: cell_figures(members).rate(phase) or 0.0 for replica, members in by_replica.items()}


def live_rate(tracks: Iterable[RankTrack], now: float) -> float:
    """The cluster's tokens/s now: each replica once (its fastest rank), replicas added."""
    best: dict[Any, float] = {}
    for track in tracks:
        if track.latest is not None:
            best[track.replica] = max(best.get(track.replica, 0.0), track.rate(now))
    return sum(best.values())


# --------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryFigure:
    """A rank's memory: what its process holds against what its device has, and which part
    of it is tensors the run knows about (weights, KV cache).

    ``in_use``: torch's allocator on a GPU, the process's resident memory on a CPU (the
    Python runtime and libraries included, hence hundreds of MiB for a tiny model: the
    tensor parts say how much of it is the model). ``capacity``: the GPU's total memory, or
    the host's on a CPU engine.
    """

    in_use: int | None = None
    peak: int | None = None
    capacity: int | None = None
    reserved: int | None = None
    device_used: int | None = None
    parts: Mapping[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        """The bar's length: ``in_use`` as a fraction of ``capacity`` (None without both)."""
        if self.in_use is None or not self.capacity:
            return None
        return min(1.0, max(0.0, self.in_use / self.capacity))

    def label(self) -> str:
        """``"384.0 MiB / 62.8 GiB"``: the bar's words."""
        if self.capacity:
            return f"{format_memory(self.in_use)} / {format_bytes(self.capacity)}"
        return format_memory(self.in_use)

    def tensors_label(self) -> str:
        """``"weights 812.0 KiB · KV 16.0 KiB"``: the tensors inside the process figure."""
        names = {"weights": "weights", "kv_cache": "KV", "activations": "activations"}
        shown = [f"{names.get(part, part)} {format_bytes(n)}" for part, n in self.parts.items() if n]
        return " · ".join(shown) or NONE

    def device_label(self) -> str:
        """The whole device as its driver sees it (other processes included), GPUs only."""
        if self.device_used is None or not self.capacity:
            return NONE
        return f"{format_bytes(self.device_used)} / {format_bytes(self.capacity)}"


def memory_of(snapshot: Snapshot | None) -> MemoryFigure:
    if snapshot is None:
        return MemoryFigure()
    memory = snapshot.get("memory") or {}
    return MemoryFigure(
        in_use=memory.get("in_use"),
        peak=memory.get("peak"),
        capacity=memory.get("device_total"),
        reserved=memory.get("reserved"),
        device_used=memory.get("device_used"),
        parts=dict(snapshot.get("memory_parts") or {}),
    )


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One engine's row, as the views show it."""

    rank: int
    host: str
    device: str
    phase: str
    tokens_per_s: str
    collectives: str
    memory: str
    memory_share: float | None  # the memory bar's length, 0..1 (None: no capacity known)
    peak: str
    tensors: str
    reserved: str = NONE
    gpu: str = NONE
    expert_load: str = NONE  # routes to this rank's experts during the call (expert parallel)
    decode_step: str = NONE  # once merged: this rank's mean decode step and its parts (mpbook.engine.steps)


def result_rates(result: Any) -> dict[int, float | None]:
    """Each rank's tokens/s as a finished run's result counts them (its replica's, in the
    decode once there is one): the rows then say what the result says."""
    decode = result.max_new_tokens and any(len(ids) > 1 for ids in result.token_ids)
    return dict(enumerate(result.tokens_per_s_by_rank("decode" if decode else "prefill")))


def _of_rank(values: Sequence[Any] | None, rank: int) -> Any:
    return values[rank] if values is not None and 0 <= rank < len(values) else None


STEP_WORDS = (("compute", "compute"), ("collectives", "coll"), ("waiting", "wait"), ("token choice", "choice"),
              ("host", "host"))


def format_step(breakdown: dict[str, float] | None) -> str:
    """``"4.1 ms: compute 2.9 · coll 0.8 · wait 0 · choice 0.2 · host 0.2"``: a rank's mean
    decode step and its measured parts, in milliseconds (they add up to the step). A pipeline
    stage's waiting in its micro-batches' first steps (the later stages still in the prefill,
    once per run) is named inside its wait: ``wait 0.35 (0.07 at start)``."""
    from ..engine.steps import START

    if not breakdown or not breakdown.get("count"):
        return NONE
    n = breakdown["count"]

    def ms(seconds: float) -> str:
        value = 1e3 * seconds / n
        return "0" if abs(value) < 0.005 else f"{value:.2f}"

    at_start = ms(breakdown.get(START, 0.0))
    wait_note = "" if at_start == "0" else f" ({at_start} at start)"
    return f"{ms(breakdown['steps'])} ms: " + " · ".join(
        f"{short} {ms(breakdown[part])}{wait_note if part == 'waiting' else ''}" for part, short in STEP_WORDS)


def row_of(track: RankTrack, *, rate: float | None, live: bool, result: Any = None) -> Row:
    """``rate``: the tokens/s to show; ``live``: the call runs (collectives show their share
    of the last second too); ``result``: the merged result of the call's run, whose figures
    (collectives, peak, expert load) replace the snapshots' once it is known."""
    snap = track.latest
    if snap is None:
        return Row(track.rank, track.host, track.device, track.outcome or "waiting", NONE, NONE, NONE, None, NONE, NONE)
    memory = memory_of(snap)
    cell = track.cell()
    seconds = cell.collective_seconds
    share = track.collective_share() if live else 0.0
    peak = memory.peak
    experts = format_count(cell.expert_tokens) if cell.expert_tokens else NONE
    step, over = NONE, ""
    if result is not None:
        step = format_step(_of_rank(getattr(result, "step_breakdown", None), track.rank))
        transports = set((_of_rank(getattr(result, "transports", None), track.rank) or {}).values())
        over = f" {'/'.join(sorted(transports))}" if transports else ""
        seconds = _of_rank(result.collective_seconds, track.rank) or 0.0
        peak = _of_rank(result.peak_memory_bytes, track.rank) or peak
        routed = _of_rank(getattr(result, "expert_tokens", None), track.rank)
        experts = format_count(routed) if any(getattr(result, "expert_tokens", None) or ()) else NONE
    return Row(
        rank=track.rank,
        host=track.host,
        device=track.device,
        phase=track.outcome or snap.get("phase", "?"),
        tokens_per_s=format_rate(rate),
        collectives=f"{seconds:.2f} s{over}" + (f" ({share:.0%})" if share >= 0.005 else ""),
        memory=memory.label(),
        memory_share=memory.share,
        peak=format_memory(peak),
        tensors=memory.tensors_label(),
        reserved=format_memory(memory.reserved),
        gpu=memory.device_label(),
        expert_load=experts,
        decode_step=step,
    )


def format_count(n: int | None) -> str:
    return NONE if n is None else f"{n:,}"
