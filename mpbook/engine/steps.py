"""Where a decode step's time goes on one rank, measured part by part.

Every decode step of a micro-batch on a stage is timed whole, and inside it:

- ``compute``: the stage's forward pass, less the collectives inside it (tensor parallel's
  all-reduces, the vocab-parallel head's gather);
- ``collectives``: every collective and send of the step, the wait for the slowest peer
  inside it included (a collective cannot finish before its last rank arrives);
- ``waiting``: receiving from another pipeline stage: the activation from the stage before,
  or the tokens from the last stage (time this stage had nothing to do);
- ``token choice``: choosing the rows' tokens and the stop test, less its collectives;
- ``host``: the rest of the step: Python between those parts (masks, positions, headers).

Apart from the parts, ``waiting at start`` is the share of ``waiting`` in each micro-batch's
first decode step. A pipeline's prefill ends on the first stage while the later stages still
work through the other micro-batches' prompts, so the first stage's first decode steps wait
for that drain, once per run (with ``small``'s 2 stages, about 13 ms of a 32-token run's
20-70 ms of waiting); the rest is what the steps wait once the pipeline runs, for whichever
stage is slower. Averaged over the steps together, the two would read as one per-step cost.

The parts add up to the steps' time; the steps and the loop around them add up to the decode
phase, which the telemetry times on its own. On a GPU the parts are host times of
asynchronous launches until the device is made to wait, so there they say where the host's
time goes, not the device's.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

PARTS = ("compute", "collectives", "waiting", "token choice", "host")
START = "waiting at start"  # the waiting of micro-batches' first decode steps (part of "waiting")
WAITS = frozenset({"recv", "recv_tokens"})  # pipeline receives: waiting for another stage


class StepBreakdown:
    """Running totals of the parts of this rank's decode steps (seconds)."""

    def __init__(self, telemetry):
        self.telemetry = telemetry
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._inside: dict[str, float] | None = None  # the current step's timed parts

    def _collective_seconds(self) -> dict[str, float]:
        # The host's clock, as every part here (on a GPU the collectives' own time is the
        # device's, which the telemetry learns later from CUDA events).
        return dict(self.telemetry.host_collective_seconds_by_kind)

    @contextlib.contextmanager
    def step(self, *, first: bool = False):
        """One micro-batch one decode step further on this stage (``first``: its first)."""
        before = self._collective_seconds()
        self._inside = inside = {"forward": 0.0, "forward collectives": 0.0, "choice": 0.0, "choice collectives": 0.0}
        began = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - began
            self._inside = None
            after = self._collective_seconds()
            delta = {kind: after.get(kind, 0.0) - before.get(kind, 0.0) for kind in after}
            waiting = sum(seconds for kind, seconds in delta.items() if kind in WAITS)
            collectives = sum(seconds for kind, seconds in delta.items() if kind not in WAITS)
            compute = inside["forward"] - inside["forward collectives"]
            choice = inside["choice"] - inside["choice collectives"]
            self.seconds["compute"] += compute
            self.seconds["collectives"] += collectives
            self.seconds["waiting"] += waiting
            if first:
                self.seconds[START] += waiting
            self.seconds["token choice"] += choice
            self.seconds["host"] += total - compute - collectives - waiting - choice
            self.seconds["steps"] += total
            self.steps += 1

    @contextlib.contextmanager
    def part(self, name: str):
        """Time ``name`` ("forward" or "choice") inside the current step, and its collectives."""
        inside = self._inside
        if inside is None:  # not in a decode step (the prefill)
            yield
            return
        before = sum(self._collective_seconds().values())
        began = time.perf_counter()
        try:
            yield
        finally:
            inside[name] += time.perf_counter() - began
            inside[f"{name} collectives"] += sum(self._collective_seconds().values()) - before

    def report(self) -> dict[str, float]:
        """The totals, with ``waiting at start`` (inside ``waiting``), ``steps`` (their sum of
        wall time) and ``count``; {} without steps."""
        if not self.steps:
            return {}
        return {**{part: self.seconds[part] for part in PARTS}, START: self.seconds[START],
                "steps": self.seconds["steps"], "count": float(self.steps)}
