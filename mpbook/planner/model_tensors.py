"""What the model holds: every parameter and buffer, grouped the way the strategies place them.

The interface is one function, :func:`model_tensors` ``(config, dtype) -> ModelTensors``:
the tensors of the embedding, of each decoder layer (with the dimension tensor parallelism
cuts), of the final norm and the LM head, and the buffers every pipeline stage keeps. The rest
of the planner only reads a :class:`ModelTensors`, so where the groups come from can change
(today: the model's module tree built on the meta device; later: the per-rank structure
mpbook.models derives from the config's own parallel plans) without touching the arithmetic.
"""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import MpbookError
from ..parallel.tensor import LAYER_PLAN
from ..units import shard_size


@dataclass(frozen=True)
class TensorShape:
    """One parameter or buffer: its shape, and the dimension tensor parallelism cuts (if any)."""

    key: int  # identity within its model, so that a tied matrix held twice is counted once
    shape: tuple[int, ...]
    element_size: int
    split_dim: int | None
    buffer: bool

    def local_bytes(self, tp: int, tp_rank: int) -> int:
        """Bytes of this rank's piece: DTensor's Shard placement, as torch.chunk cuts."""
        shape = list(self.shape)
        if self.split_dim is not None:
            shape[self.split_dim] = shard_size(shape[self.split_dim], tp, tp_rank)
        return math.prod(shape) * self.element_size


@dataclass(frozen=True, kw_only=True)
class ModelTensors:
    """The model's tensors grouped by where a pipeline stage keeps them."""

    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    dtype: str
    embedding: tuple[TensorShape, ...]  # first stage
    layers: tuple[tuple[TensorShape, ...], ...]  # one tuple per decoder layer
    final_norm: tuple[TensorShape, ...]  # last stage
    head: tuple[TensorShape, ...]  # last stage
    every_stage: tuple[TensorShape, ...]  # rotary embedding buffers
    tied: bool  # the LM head is the embedding matrix
    split_names: tuple[str, ...]  # short names of what tp cuts in a layer, for the arithmetic ("q/k/v")
    _layer_bytes: dict[tuple[int, int], tuple[tuple[int, int], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def layer_bytes(self, tp: int, tp_rank: int) -> tuple[tuple[int, int], ...]:
        """(parameter bytes, buffer bytes) of each decoder layer's piece on one tp rank.

        Kept with the tensors: every plan of the same model (and each suggested layout) asks
        again, and a large model has hundreds of tensors per rank. Exact as a sum because each
        layer's tensors are its own (checked when they are read)."""
        key = (tp, tp_rank)
        if key not in self._layer_bytes:
            self._layer_bytes[key] = tuple(
                (sum(t.local_bytes(tp, tp_rank) for t in layer if not t.buffer),
                 sum(t.local_bytes(tp, tp_rank) for t in layer if t.buffer))
                for layer in self.layers
            )
        return self._layer_bytes[key]


# The session plans before every cell, and building a module tree on meta costs tens of
# milliseconds for a 70B-shaped model (much more on a busy machine), while a key costs ~0.5 ms.
CACHE_SIZE = 8
_cache: OrderedDict[tuple[str, str, str], ModelTensors] = OrderedDict()


def model_tensors(config, dtype: str) -> ModelTensors:
    """The tensors of the model ``config`` describes, in ``dtype`` ("float32", "bfloat16", ...).

    Kept for the last few (config, dtype) pairs, keyed by the config's content, not by the
    object: an equal config loaded again is a hit, a config changed in place is a miss.
    """
    key = _cache_key(config, dtype)
    if key is not None and key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    import torch

    # A copy: from_config writes the dtype into the config it is given, the caller's otherwise.
    held = _read_module_tree(_meta_model(copy.deepcopy(config), getattr(torch, dtype)), dtype)
    if key is not None:
        _cache[key] = held
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return held


def _cache_key(config, dtype: str) -> tuple[str, str, str] | None:
    """The config's class and every field but where it was read from and its stored dtype
    (the module tree depends on neither: the dtype is the one asked for); None when the config
    does not serialize (then nothing is cached)."""
    try:
        fields = config.to_dict()
        for ignored in ("_name_or_path", "dtype", "torch_dtype"):
            fields.pop(ignored, None)
        content = json.dumps(fields, sort_keys=True, default=repr)
    except Exception:  # a config with fields json cannot write: build it every time
        return None
    return f"{type(config).__module__}.{type(config).__qualname__}", content, dtype


def _meta_model(config, torch_dtype):
    """The model's module tree with every tensor on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except (ValueError, KeyError) as exc:
        raise MpbookError(
            f"transformers has no causal LM for model_type {getattr(config, 'model_type', '?')!r} ({exc}); "
            "give the config of a causal LM"
        ) from None


# --------------------------------------------------------------------------- the module tree
# The one place that knows where the groups sit in a module tree, and it asks the model: the
# config's own pipeline plan orders the base model's stage modules (embedding, the list of
# decoder layers, final norm), transformers' output embeddings are the LM head. Swap it for
# mpbook.models' structure when that turns the config's plans into what each rank holds.
def _read_module_tree(model, dtype: str) -> ModelTensors:
    """Group the tensors of ``model`` (built on meta) into embedding, layers, norm, head."""
    architecture = type(model).__name__
    base = model.base_model
    before, layers, after = _stage_modules(model.config, base, architecture)
    head = model.get_output_embeddings()
    if head is None:
        raise MpbookError(f"{architecture} has no LM head (output embeddings); the planner counts causal LMs")
    keys: dict[int, int] = {}  # id() of a live tensor -> its key (ids are unique while the model lives)

    def tensors(*modules, split: dict[str, int | None] | None = None) -> tuple[TensorShape, ...]:
        out = []
        for module in modules:
            for kind, items in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
                for name, t in items:
                    out.append(TensorShape(
                        key=keys.setdefault(id(t), len(keys)), shape=tuple(t.shape), element_size=t.element_size(),
                        split_dim=(split or {}).get(name), buffer=kind == "buffer",
                    ))
        return tuple(out)

    embedding, final_norm, head_tensors = tensors(*before), tensors(*after), tensors(head)
    in_layers = tuple(tensors(layer, split=_layer_splits(layer, architecture)) for layer in layers)
    # What the base model keeps outside its stage modules (the rotary embedding's inverse
    # frequencies): every stage computes positions, so every stage holds it.
    outside = [t for t in base.buffers() if id(t) not in keys]
    held = ModelTensors(
        architecture=architecture,
        dtype=dtype,
        embedding=embedding,
        layers=in_layers,
        final_norm=final_norm,
        head=head_tensors,
        every_stage=tuple(
            TensorShape(key=keys.setdefault(id(t), len(keys)), shape=tuple(t.shape), element_size=t.element_size(),
                        split_dim=None, buffer=True)
            for t in outside
        ),
        tied=head.weight is model.get_input_embeddings().weight,
        split_names=tuple(_short_name(path) for path in LAYER_PLAN),
    )
    # Every tensor of the model must have a place, or the plan would silently miss memory.
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in keys]
    if stray:
        raise MpbookError(
            f"{architecture} holds {', '.join(stray[:3])} outside the embedding, decoder layers, final norm "
            "and LM head, where no pipeline stage would keep it; the planner cannot count it"
        )
    # Each layer's tensors are its own (a tied matrix is the embedding and the head only), so a
    # stage's layers add up without counting a shared tensor twice.
    in_layers = [t.key for layer in held.layers for t in layer]
    elsewhere = {t.key for group in (held.embedding, held.final_norm, held.head, held.every_stage) for t in group}
    if len(set(in_layers)) != len(in_layers) or elsewhere.intersection(in_layers):
        raise MpbookError(f"{architecture} shares tensors between its decoder layers; the planner counts each "
                          "layer's own tensors, as the pipeline stages hold them")
    return held


def _stage_modules(config, base, architecture: str):
    """(modules of the first stage, the decoder layers, modules of the last stage), in the
    order of the config's pipeline plan (``base_model_pp_plan``: module name -> inputs, outputs)."""
    import torch

    names = list(getattr(config, "base_model_pp_plan", None) or ())
    if not names:
        raise MpbookError(
            f"{architecture}: its config has no pipeline plan (base_model_pp_plan) saying where the embedding, "
            "the decoder layers and the final norm are; the planner reads models whose config has one"
        )
    try:
        modules = [base.get_submodule(name) for name in names]
    except AttributeError as exc:
        raise MpbookError(f"{architecture}: its pipeline plan names a module it does not have ({exc})") from None
    lists = [i for i, m in enumerate(modules) if isinstance(m, torch.nn.ModuleList)]
    if len(lists) != 1:
        raise MpbookError(
            f"{architecture}: its pipeline plan ({', '.join(names)}) has {len(lists)} lists of decoder layers; "
            "the planner splits exactly one over the stages"
        )
    (i,) = lists
    return modules[:i], modules[i], modules[i + 1:]


def _short_name(path: str) -> str:
    """"self_attn.q_proj" -> "q": the name the arithmetic lines use."""
    return path.rsplit(".", 1)[-1].removesuffix("_proj")


def _layer_splits(layer, architecture: str) -> dict[str, int | None]:
    """Parameter name inside one decoder layer -> the dimension tp cuts (nn.Linear is out x in).

    The plan is the one the engines apply (mpbook.parallel.tensor), so the planner counts what
    they hold."""
    splits: dict[str, int | None] = {}
    for path, style in LAYER_PLAN.items():
        try:
            sub = layer.get_submodule(path)
        except AttributeError:
            raise MpbookError(
                f"{architecture}: its decoder layers have no {path}, which the engines' tensor-parallel plan "
                "splits (mpbook.parallel.tensor.LAYER_PLAN), so the planner cannot count what a rank holds"
            ) from None
        for name, _ in sub.named_parameters(recurse=False):
            if style == "colwise":  # output rows of the weight, and the bias with them
                splits[f"{path}.{name}"] = 0
            elif name == "weight":  # rowwise: input columns; the bias is added once, replicated
                splits[f"{path}.{name}"] = 1
    return splits


# --------------------------------------------------------------------------- sizes from the config
@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The sizes a run's tensors (KV cache, activations) take from the config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> ModelDims:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )
