"""Memory before anything loads: the bytes each rank may take, the planner's prediction of a
request's layout against them, and after a device ran out anyway, the layouts that need less.

A model the planner cannot cut into parts (no pipeline) is not predicted: a device
out-of-memory on an engine is still reported with its rank and bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import MpbookError
from ..layout import Layout
from ..protocol import Request

if TYPE_CHECKING:
    from ..cluster import Cluster

TOO_BIG = "use more devices, a smaller dtype, fewer prompts or fewer new tokens"


def free_bytes(cluster: Cluster) -> list[int]:
    """The bytes each rank may take on its device."""
    engines = cluster.engines
    if cluster.device_type == "cuda":
        # A model already loaded on an engine is freed before another loads (or reused as is).
        return [e.memory_free_bytes + e.model_bytes for e in engines]
    # CPU engines on one host share its memory (each reports the host's available
    # memory): each may count on an equal share of it, and of what its models free.
    hosts = [e.host for e in engines]
    pool = {h: next(e.memory_free_bytes for e in engines if e.host == h)
            + sum(e.model_bytes for e in engines if e.host == h) for h in set(hosts)}
    return [pool[h] // hosts.count(h) for h in hosts]


def predictable(config, plans) -> bool:
    """Whether the planner can cut this model into parts, and so predict its memory."""
    from ..models import support

    return "pipeline" in support.supported_strategies(config, plans)


def predict(config, layout: Layout, *, plans, batch: int, prompt_len: int, max_new_tokens: int, dtype: str,
            microbatches: int, stage_sizes, free: Sequence[int]):
    """The planner's :class:`mpbook.planner.MemoryPlan` of ``layout`` against ``free`` bytes per rank."""
    from ..planner import plan

    return plan(
        config, dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep, plans=plans, batch=batch,
        prompt_len=prompt_len, max_new_tokens=max_new_tokens, dtype=dtype, microbatches=microbatches,
        stage_sizes=stage_sizes, device_memory_bytes=list(free), suggestions=False,
    )


def _stages_of(stage_sizes, layout: Layout):
    """The stage sizes asked for, where they fit this layout's number of stages."""
    return stage_sizes if stage_sizes and len(stage_sizes) == layout.pp > 1 else None


def check_memory(cluster: Cluster, request: Request, *, config, prompt_len: int) -> None:
    """Ask the planner whether every rank fits its device before anything loads; if not,
    name the rank, the bytes it needs and has, and the layouts that would fit."""
    if not predictable(config, request.plans):
        return
    free = free_bytes(cluster)
    predicted = predict(
        config, request.layout, plans=request.plans, batch=len(request.input_ids), prompt_len=prompt_len,
        max_new_tokens=request.max_new_tokens, dtype=request.dtype, microbatches=request.microbatches,
        stage_sizes=request.stage_sizes, free=free,
    )
    if predicted.fits:
        return
    from ..units import format_bytes

    worst = max((r for r in predicted.ranks if not r.fits), key=lambda r: r.total)
    fitting = [str(s.layout) for s in predicted.suggest() if s.fits]
    world = cluster.world_size
    where = "shared by the engines on this host" if cluster.device_type == "cpu" else "free on its device"
    advice = (
        f"layouts that fit on {world} engines: {'; '.join(fitting)}" if fitting
        else f"no layout of {world} engines fits: {TOO_BIG}"
    )
    gib = lambda n: format_bytes(n, unit="GiB")  # noqa: E731
    raise MpbookError(
        f"out of memory (predicted): rank {worst.rank} needs {gib(worst.total)} (weights {gib(worst.weights)} "
        f"+ KV cache {gib(worst.kv_cache)} + activations {gib(worst.activations)}) but has "
        f"{gib(free[worst.rank])} {where}; {advice}"
    )


def fit_test(cluster: Cluster, config, *, plans, prompts: int, prompt_len: int, max_new_tokens: int, dtype: str,
             microbatches: int, stage_sizes) -> Callable[[Layout], bool | None] | None:
    """Whether a layout of these engines would fit their memory, as the planner predicts
    (None where it cannot predict): so that the layouts an error suggests also fit."""
    if not predictable(config, plans):
        return None

    def fits(layout: Layout) -> bool | None:
        try:
            return predict(
                config, layout, plans=plans, batch=prompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                dtype=dtype, microbatches=microbatches, stage_sizes=_stages_of(stage_sizes, layout),
                free=free_bytes(cluster),
            ).fits
        except MpbookError:
            return None

    return fits


def smaller_layouts_advice(config, request: Request, *, engines: int, free: Sequence[int], prompt_len: int,
                           default_microbatches: bool = False, ranks_at_once: int | None = None) -> str:
    """What to try after ``request``'s layout ran out of memory on a device although the
    planner predicted it would fit (``free``: each rank's bytes, as :func:`free_bytes`
    says them): the layouts of these ``engines`` that the planner predicts need less memory
    per rank than the one that failed (more stages, more tp, fewer rows per replica), each
    valid for the model and the prompts and predicted to fit the engines, least memory first,
    with their predicted peaks; or, where none needs less, what else would.

    ``default_microbatches``: the run took the default micro-batches (one per stage, at most
    as many as ``ranks_at_once`` allow: :func:`mpbook.parallel.pipeline.default_microbatches`),
    so each layout is planned with its own default; else with the request's."""
    from ..parallel.pipeline import layout_microbatches
    from ..planner.suggestions import valid_layouts
    from ..units import format_bytes

    generic = "fewer prompts or new tokens per run, or more engines, need less memory per device"
    if not predictable(config, request.plans):
        return generic
    batch = len(request.input_ids)

    def peak(layout: Layout) -> int | None:
        """The largest per-rank total the planner predicts for ``layout``; None where it
        predicts the layout does not fit the engines (or cannot plan it)."""
        micro = (layout_microbatches(layout, batch // layout.dp, ranks_at_once) if default_microbatches
                 else request.microbatches)
        try:
            planned = predict(
                config, layout, plans=request.plans, batch=batch, prompt_len=prompt_len,
                max_new_tokens=request.max_new_tokens, dtype=request.dtype, microbatches=micro,
                stage_sizes=_stages_of(request.stage_sizes, layout), free=free,
            )
        except MpbookError:
            return None
        return planned.peak_bytes if planned.fits or layout == request.layout else None

    need = peak(request.layout)
    if need is None:
        return generic
    layouts = valid_layouts(config, engines, batch=batch, plans=request.plans,
                            microbatches=1 if default_microbatches else request.microbatches,
                            stage_sizes=request.stage_sizes)
    smaller = sorted(
        ((x, p) for x in layouts if x != request.layout and (p := peak(x)) is not None and p < need),
        key=lambda item: (item[1], item[0].tp, item[0].pp),
    )
    than = f"than {request.layout} ({format_bytes(need)} predicted)"
    if not smaller:
        return f"no layout of {engines} engines needs less memory per rank {than}: {TOO_BIG}"
    listed = "; ".join(f"{x} ({format_bytes(p)})" for x, p in smaller)
    return f"layouts of {engines} engines that need less memory per rank {than}: {listed}"
