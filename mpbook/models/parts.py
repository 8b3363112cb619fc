"""Each rank's part of a layout: which layers, which slices, which experts it loads and runs
(:func:`rank_part`, :func:`cut_stage`), and the tensors it then holds (:func:`held_tensors`,
which the planner counts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .structure import Structure, generic, meta_model, module_rule, param_rule, plans_key, structure


@dataclass(frozen=True)
class Part:
    """What one rank of a layout loads and runs: its stage's layers, and its shards."""

    layers: range  # global indices of its decoder layers
    first: bool  # holds the token embedding
    last: bool  # holds the final norm and the head
    tp: int
    tp_rank: int
    ep: int
    ep_rank: int
    tp_plan: dict[str, str]  # the rules applied (empty when tp == 1)
    ep_plan: dict[str, str]  # (empty when ep == 1)
    experts_reduce: tuple[str, ...]  # the mesh dims the experts' one all-reduce runs over

    def rule(self, name: str, *, param: bool) -> tuple[str | None, str | None]:
        """(style, "tp" or "ep") of a parameter or module; an ep rule wins over a tp one for the
        module it names. A parameter split both ways (an expert under ep x tp) reports its ep
        rule here; :meth:`pieces` applies both."""
        find = param_rule if param else module_rule
        for plan, kind in ((self.ep_plan, "ep"), (self.tp_plan, "tp")):
            style = find(name, plan) if plan else None
            if style:
                return style, kind
        return None, None

    def pieces(self, name: str, shape: tuple[int, ...], *, transposed: bool = False) -> list:
        """The slices of parameter ``name`` (full ``shape``) this rank keeps."""
        from ..parallel.tensor import shard_pieces

        out = []
        leaf = name.rsplit(".", 1)[-1]
        ep_style = param_rule(name, self.ep_plan) if self.ep_plan else None
        tp_style = param_rule(name, self.tp_plan) if self.tp_plan else None
        if ep_style:
            out += shard_pieces(ep_style, leaf, shape, self.ep_rank, self.ep, transposed=transposed)
        if tp_style:
            out += shard_pieces(tp_style, leaf, shape, self.tp_rank, self.tp, transposed=transposed)
        return out


def rank_part(s: Structure, layout, coords, *, stage_sizes=None) -> Part:
    """The :class:`Part` of the rank at ``coords`` of ``layout``."""
    from ..parallel.pipeline import split_layers

    stages = split_layers(s.num_layers, layout.pp, stage_sizes)
    tp_plan = s.tp_rules() if layout.tp > 1 else {}
    ep_plan = dict(s.ep_plan) if layout.ep > 1 else {}
    if ep_plan and not (layout.tp > 1 and s.experts_split_by_tp):
        # transformers' rule: an ep module keeps no tp rule (here: when its weights are not split by tp)
        tp_plan = {k: v for k, v in tp_plan.items() if not any(k == e or k.startswith(e + ".") for e in s.experts)}
    elif ep_plan:
        # ep x tp: the experts keep their tp slices, and the ep dispatch's all-reduce does the
        # tp sum as well: no moe_tp_experts all-reduce of their own.
        tp_plan = {k: v for k, v in tp_plan.items() if v != "moe_tp_experts"}
    reduce: tuple[str, ...] = ()
    if layout.ep > 1:
        reduce = ("ep", "tp") if layout.tp > 1 and s.experts_split_by_tp else ("ep",)
    elif layout.tp > 1 and s.experts:
        reduce = ("tp",)
    return Part(
        layers=stages[coords.pp], first=coords.pp == 0, last=coords.pp == layout.pp - 1,
        tp=layout.tp, tp_rank=coords.tp, ep=layout.ep, ep_rank=coords.ep,
        tp_plan=tp_plan, ep_plan=ep_plan, experts_reduce=reduce,
    )


def groups_needed(s: Structure, layout) -> list[tuple[str, ...]]:
    """The mesh groups a layout's ranks use, in the order every rank makes them."""
    out = []
    if layout.tp > 1:
        out.append(("tp",))
    if layout.ep > 1:
        out.append(("ep",))
        if layout.tp > 1 and s.experts_split_by_tp:
            out.append(("ep", "tp"))
    return out


class Absent:
    """Marker base: a module a stage does not hold (see :func:`cut_stage`)."""


def _absent(name: str):
    import torch

    class AbsentModule(torch.nn.Module, Absent):
        """Stands in for a module this pipeline stage does not hold; fails loudly if called."""

        def __init__(self):
            super().__init__()
            self.name = name

        def forward(self, *args, **kwargs):
            raise RuntimeError(f"{self.name} is not held by this pipeline stage")

    return AbsentModule()


# What a layer's modules call their index in the cache (GPT-Neo's attention: layer_id).
LAYER_INDEX_NAMES = ("layer_idx", "layer_id")


def cut_stage(model, s: Structure, part: Part) -> None:
    """Cut a (meta) CausalLM down to ``part``'s stage, in place: the layer list keeps only the
    stage's layers, renumbered from 0 (every submodule's ``layer_idx`` or ``layer_id``), so the stage's own cache
    and masks see exactly the layers it holds; a later stage drops the token embedding (other
    pre-layer modules are glue the base forward applies to ``inputs_embeds``, kept); a non-last
    stage drops the head and replaces the final modules with Identity. The config is not
    touched: :func:`narrow_config` does that once the buffers are made."""
    import torch

    base = model.get_submodule(s.base_prefix) if s.base_prefix else model
    container = base.get_submodule(s.layers)
    kept = torch.nn.ModuleList(container[i] for i in part.layers)
    _set_submodule(base, s.layers, kept)
    for local, layer in enumerate(kept):
        for sub in layer.modules():
            for index in LAYER_INDEX_NAMES:
                if hasattr(sub, index):
                    setattr(sub, index, local)
    if not part.first:
        _set_submodule(model, s.embedding, _absent(s.embedding))
    if not part.last:
        for name in s.post:
            _set_submodule(base, name, torch.nn.Identity())
        for name in s.head:
            _set_submodule(model, name, _absent(name))


def narrow_config(config, layers: range) -> None:
    """The config every module of a cut model reads, sliced in place to the stage's layers."""
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]


def _set_submodule(root, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def global_name(s: Structure, part: Part, name: str) -> str:
    """A cut model's parameter name as the whole model's (layer numbers back to global)."""
    prefix = s.layer_prefix
    if not name.startswith(prefix):
        return name
    local, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{part.layers[int(local)]}.{rest}"


# ----------------------------------------------------------------------------- what a rank holds
@dataclass(frozen=True)
class Held:
    """One tensor a rank holds: its name in the whole model, its local shape and bytes."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    kind: str  # "embedding", "layers", "experts", "norm", "head", "other", "buffer"
    shared_with: str | None = None  # a tied tensor held once (counted under the name it reads)


def held_tensors(config, layout, rank: int, *, plans: dict | None = None, stage_sizes=None,
                 dtype: str = "float32", attention: str | None = None) -> list[Held]:
    """Every parameter and buffer the rank ``rank`` of ``layout`` holds, as the engines load it
    (:func:`cut_stage`, then each tensor's slices): its stage's tensors, split by its tp and ep
    rules (experts by ep, the vocabulary by tp). What the planner counts.

    The whole model's tensors are read once per (config, plans, dtype, attention); a rank's
    are then picked from them, with each rule resolved once per tensor name pattern, so asking
    for every rank of many layouts stays cheap."""
    s = structure(config, plans, attention=attention)
    part = rank_part(s, layout, layout.coords(rank), stage_sizes=stage_sizes)
    params, buffers = _inventory(config, plans, dtype, attention)
    layer_prefix = s.layer_prefix
    last_only = tuple(s.full(p) + "." for p in s.post) + tuple(h + "." for h in s.head)

    def held(name: str) -> bool:
        if name.startswith(layer_prefix):
            return int(name[len(layer_prefix):].split(".", 1)[0]) in part.layers
        if name.startswith(s.embedding + "."):
            return part.first
        if name.startswith(last_only):
            return part.last
        return True  # glue every stage keeps (GPT-2's position embedding, rotary buffers)

    memo: dict[tuple, tuple[list, tuple, str]] = {}  # (pattern, shape, transposed) -> pieces, local shape, kind
    out: list[Held] = []
    seen: dict[int, tuple[str, list]] = {}  # a tensor held under two names (a tied head): its first name, slices
    for name, pattern, key, full, element_size, transposed in params:
        if not held(name):
            continue
        found = memo.get((pattern, full, transposed))
        if found is None:
            pieces = part.pieces(name, full, transposed=transposed)
            found = memo[(pattern, full, transposed)] = (pieces, _local_shape(full, pieces), _kind(s, name))
        pieces, shape, kind = found
        first = seen.get(key)
        if first is not None and first[1] == pieces:
            # tied, and both sides take the same slice: one tensor (the loader ties them again)
            out.append(Held(name, (), 0, kind, shared_with=first[0]))
            continue
        seen.setdefault(key, (name, pieces))
        out.append(Held(name, shape, math.prod(shape) * element_size, kind))
    for name, full, element_size in buffers:
        if held(name):
            out.append(Held(name, full, math.prod(full) * element_size, "buffer"))
    return out


_INVENTORY: dict[tuple, tuple[list, list]] = {}


def _inventory(config, plans, dtype: str, attention):
    """The whole model's parameters (name, its pattern, identity, shape, element size,
    Conv1D-transposed) and buffers (name, shape, element size), from its meta-device tree."""
    import copy

    import torch

    from ..parallel.tensor import _transposed
    from ..protocol import DTYPES

    key = (type(config).__name__, config.to_json_string(use_diff=False), plans_key(plans), dtype, attention)
    if key not in _INVENTORY:
        model = meta_model(copy.deepcopy(config), attention=attention, dtype=getattr(torch, DTYPES[dtype]))
        modules = dict(model.named_modules())
        params = [(name, generic(name), id(p), tuple(p.shape), p.element_size(),
                   _transposed(modules[name.rpartition(".")[0]]))
                  for name, p in model.named_parameters(remove_duplicate=False)]
        buffers = [(name, tuple(b.shape), b.element_size()) for name, b in model.named_buffers()]
        if len(_INVENTORY) > 16:
            _INVENTORY.pop(next(iter(_INVENTORY)))
        _INVENTORY[key] = (params, buffers)
    return _INVENTORY[key]


def held_bytes(tensors: list[Held]) -> dict[str, int]:
    """Bytes by kind ("embedding", "layers", "experts", "norm", "head", "other", "buffer") of
    :func:`held_tensors`' answer, and their "parameters" total (buffers apart)."""
    out: dict[str, int] = {}
    for t in tensors:
        out[t.kind] = out.get(t.kind, 0) + t.nbytes
    out["parameters"] = sum(t.nbytes for t in tensors if t.kind != "buffer")
    return out


def _kind(s: Structure, name: str) -> str:
    """Where a tensor belongs: "embedding" (the token embedding), "layers", "experts", "norm"
    (the modules after the layers), "head", or "other" (glue every stage keeps)."""
    g = generic(name)
    if any(g.startswith(e + ".") for e in s.experts):
        return "experts"
    if g.startswith(s.layer_prefix):
        return "layers"
    if name.startswith(s.embedding + "."):
        return "embedding"
    if any(name.startswith(h + ".") for h in s.head):
        return "head"
    if any(name.startswith(s.full(p) + ".") for p in s.post):
        return "norm"
    return "other"


def _local_shape(shape: tuple[int, ...], pieces) -> tuple[int, ...]:
    out = list(shape)
    by_dim: dict[int, int] = {}
    for p in pieces:
        d = p.dim % len(shape)
        by_dim[d] = by_dim.get(d, 0) + (p.stop - p.start)
    for d, n in by_dim.items():
        out[d] = n
    return tuple(out)
