"""One rank's bytes: the model's tensors it holds, plus what the run adds (KV cache, activations)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..layout import Layout
from ..parallel.pipeline import split_layers
from ..protocol import ELEMENT_SIZE
from ..units import format_bytes, split_evenly
from .activations import IDLE, activations
from .kv_cache import CacheLayer, cache_layers, kv_cache
from .model_tensors import ModelDims, ModelTensors, TensorShape
from .rendering import layers_label
from .workload import Workload

if TYPE_CHECKING:
    from .devices import Device


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """Predicted bytes of one rank; ``total`` is its peak: weights + KV cache + activations."""

    rank: int
    dp: int
    pp: int
    ep: int
    tp: int
    layers: range
    rows: int  # prompts of this rank's data-parallel replica
    microbatch_rows: int  # rows of the largest micro-batch
    parameters: int
    buffers: int
    kv_cache: int
    activations: int
    weight_parts: dict[str, int] = field(repr=False)
    kv_formula: str = field(repr=False)
    activation_parts: dict[str, int] = field(repr=False)
    activation_phase: str = field(repr=False)
    device: Device | None = None
    fits: bool | None = None

    @property
    def weights(self) -> int:
        return self.parameters + self.buffers

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


@dataclass
class _Held:
    """The weights one rank holds, by part, each tensor counted once (a tie is one matrix)."""

    tp: int
    tp_rank: int
    parameters: int = 0
    buffers: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def hold(self, label: str, tensors: Iterable[TensorShape]) -> None:
        total = 0
        for t in tensors:
            if t.key in self.seen:  # a tied LM head on the embedding's stage: one matrix
                continue
            self.seen.add(t.key)
            b = t.local_bytes(self.tp, self.tp_rank)
            total += b
            if t.buffer:
                self.buffers += b
            else:
                self.parameters += b
        self.parts[label] = self.parts.get(label, 0) + total

    def add(self, label: str, *, parameters: int, buffers: int) -> None:
        """Bytes already summed, of tensors held nowhere else (a stage's decoder layers)."""
        self.parameters += parameters
        self.buffers += buffers
        self.parts[label] = self.parts.get(label, 0) + parameters + buffers


@dataclass(frozen=True, kw_only=True)
class PlannedModel:
    """What the planner reads of a model, once per plan: its tensors, the sizes of a run's
    tensors, how each layer caches, and the config (to check other layouts against)."""

    tensors: ModelTensors
    dims: ModelDims
    cache: tuple[CacheLayer, ...]
    config: Any

    @classmethod
    def read(cls, config, tensors: ModelTensors) -> PlannedModel:
        return cls(tensors=tensors, dims=ModelDims.of(config), cache=cache_layers(config), config=config)


def rank_plans(model: PlannedModel, layout: Layout, work: Workload) -> list[RankPlan]:
    """Every rank of ``layout`` running ``work``: its weights, KV cache and activations."""
    held, dims, cached = model.tensors, model.dims, model.cache
    stages = split_layers(len(held.layers), layout.pp, work.stage_sizes)
    replicas = split_evenly(work.batch, layout.dp)
    e = ELEMENT_SIZE[work.dtype]
    out = []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        layers = stages[c.pp]
        first, last = c.pp == 0, c.pp == layout.pp - 1
        rows = len(replicas[c.dp])
        mb = max((len(r) for r in split_evenly(rows, work.microbatches)), default=0)
        weights = _weights(held, layers, first=first, last=last, tp=layout.tp, tp_rank=c.tp)
        kv = kv_cache(cached, dims, work, layers=layers, rows=rows, element_size=e, tp=layout.tp, tp_rank=c.tp)
        act = activations(
            dims, work, rows=rows, microbatch_rows=mb, cached=kv.tokens_per_layer, element_size=e,
            tp=layout.tp, tp_rank=c.tp, last=last, pp=layout.pp,
        ) if rows else IDLE
        out.append(RankPlan(
            rank=rank, dp=c.dp, pp=c.pp, ep=c.ep, tp=c.tp, layers=layers, rows=rows, microbatch_rows=mb,
            parameters=weights.parameters, buffers=weights.buffers, kv_cache=kv.bytes, activations=act.bytes,
            weight_parts=weights.parts, kv_formula=kv.formula, activation_parts=act.parts,
            activation_phase=act.phase,
        ))
    return out


def _weights(held: ModelTensors, layers: range, *, first: bool, last: bool, tp: int, tp_rank: int) -> _Held:
    """A stage's share: the embedding on the first, its layers cut by tp, norm and head on the
    last, and the rotary buffers on every stage."""
    w = _Held(tp=tp, tp_rank=tp_rank)
    if first:
        w.hold("embedding", held.embedding)
    sizes = [held.layer_bytes(tp, tp_rank)[i] for i in layers]
    per_layer = {params + buffers for params, buffers in sizes}
    detail = f"{len(layers)} x {format_bytes(per_layer.pop())}" if len(per_layer) == 1 else f"{len(layers)} layers"
    if tp > 1:
        detail += f", {'/'.join(held.split_names)} at 1/{tp}"
    w.add(f"{layers_label(layers)} ({detail})", parameters=sum(p for p, _ in sizes), buffers=sum(b for _, b in sizes))
    if last:
        w.hold("final norm", held.final_norm)
        w.hold("LM head (tied: the embedding)" if held.tied and first else "LM head", held.head)
    w.hold("rotary buffers", held.every_stage)
    return w
