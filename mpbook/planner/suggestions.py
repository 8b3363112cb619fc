"""Other layouts over the same engines: which are valid for the model, which fit, and why (not)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from ..cluster.hosts import spanning_groups
from ..layout import Layout
from ..models.support import layout_problems
from ..units import format_bytes as fb
from .placement import Device
from .ranks import PlannedModel, fit, ranks_memory
from .workload import Workload


@dataclass(frozen=True)
class Suggestion:
    """A layout over the same engines: whether it is valid and fits, and why (not)."""

    layout: Layout
    valid: bool
    fits: bool
    peak_bytes: int | None  # the largest per-rank total
    reason: str

    def __str__(self) -> str:
        mark = "fits" if self.fits else ("does not fit" if self.valid else "invalid")
        peak = f"{fb(self.peak_bytes):>10} per rank at most" if self.peak_bytes is not None else " " * 27
        return f"{str(self.layout):<22} {mark:<13} {peak}  {self.reason}"


def layouts(world: int, *, experts: bool = False) -> list[Layout]:
    """Every (dp, pp, tp) whose product is ``world``; with ``experts`` also every ep > 1
    (the planner's suggestions leave expert parallel out: ep=1)."""
    eps = range(1, world + 1) if experts else (1,)
    return [
        Layout(dp, pp, world // (dp * pp * ep), ep)
        for dp in range(1, world + 1)
        for pp in range(1, world + 1)
        for ep in eps
        if world % (dp * pp * ep) == 0
    ]


def why_invalid(config, layout: Layout, batch: int | None = None, *, plans: dict | None = None,
                microbatches: int = 1, stage_sizes=None) -> str | None:
    """The first reason ``layout`` cannot run the model on ``batch`` prompts cut into
    ``microbatches`` per replica (the error's first clause), or None."""
    problems = layout_problems(config, layout, plans, stage_sizes=stage_sizes)
    if problems:
        return problems[0].split(";")[0]
    if batch is not None and layout.dp > batch:
        return f"dp={layout.dp} > {batch} prompt{'s' if batch != 1 else ''}: replicas would sit idle"
    smallest = batch // layout.dp if batch is not None else None
    if smallest is not None and microbatches > smallest:
        return (f"{microbatches} micro-batches > the {smallest} prompt{'s' if smallest != 1 else ''} "
                "of the smallest replica")
    return None


def valid_layouts(config, world: int, *, batch: int | None = None, plans: dict | None = None,
                  microbatches: int = 1, stage_sizes=None) -> list[Layout]:
    """Every layout over ``world`` engines that can run the model (expert parallel included
    for a mixture of experts) on ``batch`` prompts with ``microbatches`` per replica: what
    advice may offer. ``stage_sizes`` (layers per stage) are checked for the layouts with as
    many stages; the others split the layers evenly."""
    from ..models.support import supported_strategies

    experts = "expert" in supported_strategies(config, plans)
    return [
        x for x in layouts(world, experts=experts)
        if why_invalid(config, x, batch, plans=plans, microbatches=microbatches,
                       stage_sizes=stage_sizes if stage_sizes and len(stage_sizes) == x.pp else None) is None
    ]


# Measured links across hosts count as slower than those within a host only past this ratio
# (latency up or bandwidth down): pairs on 2 shared cores differ by more than 1.3x by chance.
SLOWER_PAST = 1.5


def hosts_of(devices: list[Device]) -> list[str] | None:
    """Each rank's host, when the engines are on several hosts (sizes given by hand say none)."""
    if any(d.name == "given" for d in devices) or len({d.host for d in devices}) < 2:
        return None
    return [d.host for d in devices]


def across_hosts_slower(devices: list[Device]) -> tuple[bool, str]:
    """Whether links across hosts are slower than within one: so measured (``bench --links``),
    or assumed when nothing was measured; and the measured figures in words."""
    links = {(x.low, x.high): x for d in devices for x in d.links}.values()
    within = [x for x in links if not x.across_hosts]
    across = [x for x in links if x.across_hosts]
    if not within or not across:
        return True, ""
    latency = [statistics.median(x.latency_s for x in group) for group in (within, across)]
    bandwidth = [statistics.median(x.bandwidth_bytes_per_s for x in group) for group in (within, across)]
    words = f"measured {latency[1] * 1e3:.3f} ms across vs {latency[0] * 1e3:.3f} ms within"
    return latency[1] > SLOWER_PAST * latency[0] or bandwidth[1] * SLOWER_PAST < bandwidth[0], words


def host_placement(layout: Layout, devices: list[Device]) -> tuple[int, str]:
    """(1 to rank the layout after the others, else 0; a short phrase why) for engines on
    several hosts: a tp or ep group across hosts pays the slow link in every layer."""
    hosts = hosts_of(devices)
    if hosts is None or (layout.tp == 1 and layout.ep == 1):
        return 0, ""
    spans = spanning_groups(layout, hosts)
    if not spans:
        return 0, "tp/ep groups inside hosts"
    slower, measured = across_hosts_slower(devices)
    dims = spans[0][0]
    if not slower:
        return 0, f"{dims} group across hosts, {measured}: no slower here"
    return 1, f"{dims} group across hosts" + (f" ({measured})" if measured else ": the slow link in every layer")


def suggest(model: PlannedModel, work: Workload, world: int, devices: list[Device]) -> list[Suggestion]:
    """Every layout over ``world`` engines: fitting ones first (most headroom first), then the
    valid ones that do not fit, then the invalid ones. Engines on several hosts: within each,
    layouts whose tp and ep groups stay inside a host come first, unless the measured links
    (``%mp status --links``) show the hosts' link no slower."""
    good, bad = [], []
    for layout in layouts(world):
        why = why_invalid(model.config, layout, work.batch, plans=model.plans, microbatches=work.microbatches)
        if why is not None:
            bad.append(Suggestion(layout, False, False, None, why))
            continue
        # Custom stage sizes belong to the asked layout; the others split evenly.
        ranks = fit(ranks_memory(model, layout, replace(work, stage_sizes=None)), devices)
        peak = max(r.total for r in ranks)
        if all(r.fits for r in ranks):
            if devices[0].shared:
                together = sum(r.total for r in ranks if r.device.host == devices[0].host)
                reason = f"{fb(together)} together of {fb(devices[0].free_bytes)} shared host memory"
            else:
                reason = f"{fb(min(d.free_bytes for d in devices))} free on the smallest device"
            good.append(Suggestion(layout, True, True, peak, reason))
        else:
            worst = next(r for r in ranks if not r.fits)
            reason = f"rank {worst.rank} needs {fb(worst.total)}"
            if worst.device.shared:
                host = worst.device.host
                reason = f"the ranks on {host} need {fb(sum(r.total for r in ranks if r.device.host == host))} together"
            bad.append(Suggestion(layout, True, False, peak, f"{reason}, {fb(worst.device.free_bytes)} free"))
    placed = {s.layout: host_placement(s.layout, devices) for s in good + bad if s.valid}
    good, bad = [_with_note(s, placed) for s in good], [_with_note(s, placed) for s in bad]
    # Groups inside hosts first; then most headroom; among equals, fewer collectives: smaller
    # tp, then smaller pp.
    key = lambda g: (placed[g.layout][0], g.peak_bytes if g.peak_bytes is not None else math.inf,  # noqa: E731
                     g.layout.tp, g.layout.pp)
    return sorted(good, key=key) + sorted((b for b in bad if b.valid), key=key) + [b for b in bad if not b.valid]


def _with_note(s: Suggestion, placed: dict[Layout, tuple[int, str]]) -> Suggestion:
    note = placed.get(s.layout, (0, ""))[1]
    return replace(s, reason=f"{s.reason}; {note}") if note else s
