"""One rank's bytes: the model's tensors it holds, plus what the run adds (KV cache, activations)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..layout import Layout
from ..parallel.pipeline import split_layers
from ..protocol import ELEMENT_SIZE
from ..units import format_bytes, split_evenly
from .activations import IDLE, activations
from .kv_cache import CacheLayer, cache_layers, kv_cache
from .placement import Device
from .model_tensors import ModelDims, ModelTensors
from .workload import Workload


@dataclass(frozen=True, kw_only=True)
class RankMemory:
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


def layers_label(layers: range) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]}-{layers[-1]}"


def fit(ranks: list[RankMemory], devices: list[Device]) -> list[RankMemory]:
    """Each rank with its device and whether it fits; ranks sharing host memory fit together."""
    pools: dict[str, int] = {}
    for r, dev in zip(ranks, devices):
        if dev.shared:
            pools[dev.host] = pools.get(dev.host, 0) + r.total
    return [
        replace(r, device=dev, fits=(pools[dev.host] if dev.shared else r.total) <= dev.free_bytes)
        for r, dev in zip(ranks, devices)
    ]


@dataclass
class _Weights:
    """The weights one rank holds: parameters and buffers, and bytes by part."""

    parameters: int = 0
    buffers: int = 0
    parts: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, nbytes: int, *, buffer: bool = False) -> None:
        if buffer:
            self.buffers += nbytes
        else:
            self.parameters += nbytes
        self.parts[label] = self.parts.get(label, 0) + nbytes


@dataclass(frozen=True, kw_only=True)
class PlannedModel:
    """What the planner reads of a model, once per plan: its tensors, the sizes of a run's
    tensors, how each layer caches, whether tp splits its attention heads, and the config and
    plans (to check other layouts against)."""

    tensors: ModelTensors
    dims: ModelDims
    cache: tuple[CacheLayer, ...]
    config: Any
    heads_split_by_tp: bool = True
    vocab_parallel_head: bool = True  # under tp the LM head is split over the vocabulary
    plans: dict | None = None

    @classmethod
    def read(cls, config, tensors: ModelTensors, plans: dict | None = None) -> PlannedModel:
        from ..models.structure import structure

        s = structure(config, plans)
        rules = s.tp_rules()
        vocab = bool(s.head) and all(rules.get(h) == "colwise" for h in s.head)
        return cls(tensors=tensors, dims=ModelDims.of(config), cache=cache_layers(config), config=config,
                   heads_split_by_tp=s.heads_split_by_tp, vocab_parallel_head=vocab, plans=plans)


def ranks_memory(model: PlannedModel, layout: Layout, work: Workload) -> list[RankMemory]:
    """Every rank of ``layout`` running ``work``: its weights, KV cache and activations."""
    held, dims, cached = model.tensors, model.dims, model.cache
    # none asked: balanced by the weights read, as a run has them (held() resolves them the same way)
    stages = split_layers(len(held.layers), layout.pp, work.stage_sizes or held.stage_sizes(layout.pp))
    replicas = split_evenly(work.batch, layout.dp)
    e = ELEMENT_SIZE[work.dtype]
    # Attention is split by tp when the plan splits the heads (a gathered qkv computes every
    # head on every rank), and replicated over ep: the KV cache follows.
    heads_tp = layout.tp if model.heads_split_by_tp else 1
    out = []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        layers = stages[c.pp]
        last = c.pp == layout.pp - 1
        rows = len(replicas[c.dp])
        mb = max((len(r) for r in split_evenly(rows, work.microbatches)), default=0)
        weights = _weights(held, layout, rank, layers, work.stage_sizes)
        kv = kv_cache(cached, dims, work, layers=layers, rows=rows, element_size=e, tp=heads_tp,
                      tp_rank=c.tp if heads_tp > 1 else 0)
        act = activations(
            dims, work, rows=rows, microbatch_rows=mb, cached=kv.tokens_per_layer, element_size=e,
            tp=layout.tp, tp_rank=c.tp, last=last, pp=layout.pp, heads_tp=heads_tp,
            vocab_tp=layout.tp if model.vocab_parallel_head else 1,
        ) if rows else IDLE
        out.append(RankMemory(
            rank=rank, dp=c.dp, pp=c.pp, ep=c.ep, tp=c.tp, layers=layers, rows=rows, microbatch_rows=mb,
            parameters=weights.parameters, buffers=weights.buffers, kv_cache=kv.bytes, activations=act.bytes,
            weight_parts=weights.parts, kv_formula=kv.formula, activation_parts=act.parts,
            activation_phase=act.phase,
        ))
    return out


def _weights(held: ModelTensors, layout: Layout, rank: int, layers: range, stage_sizes) -> _Weights:
    """A rank's share, as mpbook.models.structure cuts it: the embedding on the first stage, its
    layers (the plan's projections at 1/tp, the experts at 1/ep), norm and head on the last, the
    glue and buffers every stage keeps; the vocabulary (embedding, head) at 1/tp."""
    tensors = held.held(layout, rank, stage_sizes)
    by_kind: dict[str, int] = {}
    for t in tensors:
        by_kind[t.kind] = by_kind.get(t.kind, 0) + t.nbytes
    w = _Weights()
    vocab = f" (1/{layout.tp} of the vocabulary)" if layout.tp > 1 else ""
    if "embedding" in by_kind:
        w.add(f"embedding{vocab}", by_kind["embedding"])
    per_layer: dict[int, int] = {}
    prefix = held.layer_prefix
    for t in tensors:
        if t.kind in ("layers", "experts"):
            index = int(t.name[len(prefix):].split(".", 1)[0])
            per_layer[index] = per_layer.get(index, 0) + t.nbytes
    sizes = set(per_layer.values())
    detail = f"{len(layers)} x {format_bytes(sizes.pop())}" if len(sizes) == 1 else f"{len(layers)} layers"
    if layout.tp > 1 and held.split_names:
        detail += f", {'/'.join(held.split_names)} at 1/{layout.tp}"
    if layout.ep > 1:
        detail += f", experts at 1/{layout.ep}"
    w.add(f"{layers_label(layers)} ({detail})", sum(per_layer.values()))
    if "other" in by_kind:
        w.add("on every stage", by_kind["other"])
    if "norm" in by_kind:
        w.add("final norm", by_kind["norm"])
    head = [t for t in tensors if t.kind == "head"]
    if head:
        tied = all(t.shared_with is not None for t in head)
        w.add("LM head (tied: the embedding)" if tied else f"LM head{vocab}", sum(t.nbytes for t in head))
    w.add("buffers", by_kind.get("buffer", 0), buffer=True)
    return w
