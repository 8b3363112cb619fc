"""Benchmarks, measured side by side in one run and reported as ratios.

``python -m mpbook bench --dashboard-overhead``: what watching costs. The same engine
workload runs with the dashboard on (engines publish snapshots, the client refreshes a
widget dashboard) and off (no publishing, no dashboard), interleaved A B B A so that drift
in the machine's load falls on both alike; the report is the median ratio of their times.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

# A stand-in for generation until strategies exist: a CPU-bound loop of matmuls that
# reports a "decode" token per step, as a strategy would.
WORKLOAD = """
import time as _time
_x = torch.randn(__SIZE__, __SIZE__)
_w = torch.randn(__SIZE__, __SIZE__)
_began, _cpu0 = _time.perf_counter(), _time.process_time()
with telemetry.phase_scope("prefill"):
    _x = _x @ _w
    telemetry.add_tokens("prefill", __SIZE__)
with telemetry.phase_scope("decode"):
    for _step in range(__STEPS__):
        _x = torch.tanh(_x @ _w)
        telemetry.add_tokens("decode", 1)
# process_time counts every thread of the engine: the publisher's work shows up here
# even when other processes' load makes wall times noisy.
_bench = (_time.perf_counter() - _began, _time.process_time() - _cpu0)
"""


def _set_publishing(state, on: bool) -> None:
    state.publisher.enabled = on


def _published(state) -> int:
    return state.publisher.published


@dataclass(frozen=True)
class Sample:
    """One run of the workload."""

    engine_s: float  # the slowest rank's loop, wall time
    engine_cpu_s: float  # CPU time of the engine processes during the loop, all ranks
    wall_s: float  # the client's wall time of the call
    client_cpu_s: float  # the client's CPU time during the call (the dashboard's drawing included)


def _median_ratio(on: list[float], off: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(on, off))


@dataclass(frozen=True)
class OverheadReport:
    rounds: int
    steps: int
    on: list[Sample]  # dashboard on: engines publish, the client refreshes a widget dashboard
    off: list[Sample]
    snapshots_per_s: float  # published per engine per second, dashboard on
    refreshes_per_s: float  # dashboard view refreshes per second

    def ratio(self, field: str) -> float:
        """Median over the A/B pairs of on/off for one field of :class:`Sample`."""
        return _median_ratio([getattr(s, field) for s in self.on], [getattr(s, field) for s in self.off])

    @property
    def engine_ratio(self) -> float:
        """The slowdown of the engines' work (wall time; noisy when the machine is shared)."""
        return self.ratio("engine_s")

    @property
    def engine_cpu_ratio(self) -> float:
        """The engines' CPU time on/off: the publisher's cost, robust to other processes' load."""
        return self.ratio("engine_cpu_s")

    @property
    def client_cpu_added(self) -> float:
        """CPU seconds the client spends on the dashboard per second of the call."""
        on = statistics.median(s.client_cpu_s / s.wall_s for s in self.on)
        off = statistics.median(s.client_cpu_s / s.wall_s for s in self.off)
        return on - off

    def format(self) -> str:
        med = statistics.median

        def line(name: str, field: str) -> str:
            a, b, r = med(getattr(s, field) for s in self.on), med(getattr(s, field) for s in self.off), self.ratio(field)
            return f"  {name:<18} on {a:.3f} s  off {b:.3f} s  ratio {r:.4f} ({(r - 1) * 100:+.2f}%)"

        return "\n".join(
            [
                f"dashboard overhead: {self.rounds} rounds A B B A, {self.steps} matmul steps per run (median of on/off pairs)",
                line("engine loop, wall", "engine_s"),
                line("engine loop, CPU", "engine_cpu_s"),
                line("client call, wall", "wall_s"),
                f"  client CPU added by the dashboard: {self.client_cpu_added * 100:.2f}% of a core",
                f"  while on: {self.snapshots_per_s:.1f} snapshots/s per engine, "
                f"{self.refreshes_per_s:.1f} dashboard refreshes/s",
            ]
        )


def dashboard_overhead(wb, *, rounds: int = 6, seconds: float = 1.5, size: int = 192) -> OverheadReport:
    """Run the workload with the dashboard on and off, interleaved, on every rank of ``wb``.

    ``seconds``: about how long one run lasts (the step count is calibrated to it once).
    """
    from .dashboard import Dashboard

    if rounds < 1 or seconds <= 0:
        raise ValueError(f"rounds={rounds}, seconds={seconds}: need at least one round of a positive length")
    ids = wb.engine_ids()

    def run(steps: int, on: bool) -> tuple[float, float, Dashboard | None]:
        wb.apply(_set_publishing, on, stream=False, what="switching the publisher")
        dash = Dashboard(wb, mode="widget") if on else None
        code = WORKLOAD.replace("__SIZE__", str(size)).replace("__STEPS__", str(steps))
        began, cpu0 = time.perf_counter(), time.process_time()
        wb.run(code, dashboard=dash, stream=False)
        wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu0
        per_rank = wb.client[ids].pull("_bench", block=True)
        return Sample(max(w for w, _ in per_rank), sum(c for _, c in per_rank), wall, client_cpu), dash

    try:
        # Calibrate: how many steps make a run of about `seconds` (dashboard off).
        probe, _ = run(50, False)
        steps = max(50, int(50 * seconds / max(probe.engine_s, 1e-6)))
        run(steps, False)  # warm-up at full length
        on: list[Sample] = []
        off: list[Sample] = []
        published_before = sum(wb.apply(_published, stream=False))
        refreshes = 0
        for i in range(rounds):
            for publishing in (True, False) if i % 2 == 0 else (False, True):
                sample, dash = run(steps, publishing)
                (on if publishing else off).append(sample)
                if dash is not None:
                    refreshes += dash.refreshes
        published = sum(wb.apply(_published, stream=False)) - published_before
    finally:
        wb.apply(_set_publishing, True, stream=False, what="switching the publisher back on")
    on_time = sum(s.wall_s for s in on)
    return OverheadReport(
        rounds=rounds,
        steps=steps,
        on=on,
        off=off,
        snapshots_per_s=published / wb.world_size / on_time,
        refreshes_per_s=refreshes / on_time,
    )
