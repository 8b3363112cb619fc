"""What the model holds: every parameter and buffer, and what each rank of a layout keeps.

The interface is one function, :func:`model_tensors` ``(config, dtype, plans=None) ->
ModelTensors``. What a rank holds comes from :mod:`mpbook.models.parts`, the module the
engines' loader reads too: the model's own parallel plans (its config's pp / tp / ep plans, or a
user's) turned into each rank's stage and slices, so the planner counts what the engines hold
for every family mpbook splits: layers by pp, the plan's projections and the vocabulary
(embedding and head) by tp, the experts by ep.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..errors import MpbookError


@dataclass(frozen=True, kw_only=True)
class ModelTensors:
    """The model's tensors: the whole model's, by decoder layer, and any rank's share."""

    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    dtype: str
    layers: tuple[tuple[Any, ...], ...]  # the whole model's tensors of each decoder layer (structure.Held)
    split_names: tuple[str, ...]  # short names of what the tp plan splits in a layer, for the arithmetic ("q/k/v")
    layer_prefix: str  # the decoder layers' names start with it ("model.layers.")
    head_bytes: int = 0  # the LM head's weights, read every decode step (a tied one: the embedding's)
    config: Any = field(repr=False, compare=False)
    plans: dict | None = field(default=None, repr=False, compare=False)
    _held: dict = field(default_factory=dict, repr=False, compare=False)

    def stage_sizes(self, pp: int) -> tuple[int, ...] | None:
        """Layers per stage when none are asked for (None without stages): balanced by the
        weights a decode step reads, the head counted in layers of the mean layer's bytes
        (:func:`mpbook.parallel.pipeline.balanced_stage_sizes`)."""
        from ..parallel.pipeline import balanced_stage_sizes

        if pp <= 1:
            return None
        layer_bytes = sum(t.nbytes for layer in self.layers for t in layer) / max(len(self.layers), 1)
        return tuple(balanced_stage_sizes(len(self.layers), pp, self.head_bytes / layer_bytes if layer_bytes else 0.0))

    def held(self, layout, rank: int, stage_sizes=None) -> list:
        """What rank ``rank`` of ``layout`` holds (:func:`mpbook.models.parts.held_tensors`),
        kept: every plan of the same model (and each suggested layout) asks again. Without
        ``stage_sizes``, the stages a run has when none are asked for (:meth:`stage_sizes`)."""
        from ..models.parts import held_tensors

        stage_sizes = stage_sizes or self.stage_sizes(layout.pp)
        key = (layout, rank, tuple(stage_sizes) if stage_sizes else None)
        if key not in self._held:
            self._held[key] = held_tensors(self.config, layout, rank, plans=self.plans, stage_sizes=stage_sizes,
                                           dtype=self.dtype)
        return self._held[key]


# The session plans before every cell, and reading the model costs tens of milliseconds for a
# 70B-shaped model (much more on a busy machine), while a key costs ~0.5 ms.
CACHE_SIZE = 8
_cache: OrderedDict[tuple, ModelTensors] = OrderedDict()


def model_tensors(config, dtype: str, plans: dict | None = None) -> ModelTensors:
    """The tensors of the model ``config`` describes, in ``dtype`` ("float32", "bfloat16", ...),
    split by its own plans (or ``plans``, a user's, in the same format).

    Kept for the last few (config, dtype, plans), keyed by the config's content, not by the
    object: an equal config loaded again is a hit, a config changed in place is a miss.
    """
    key = _cache_key(config, dtype, plans)
    if key is not None and key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    held = _read(config, dtype, plans)
    if key is not None:
        _cache[key] = held
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return held


def _cache_key(config, dtype: str, plans) -> tuple | None:
    """The config's class and every field but where it was read from and its stored dtype
    (the module tree depends on neither: the dtype is the one asked for), and the plans; None
    when the config does not serialize (then nothing is cached)."""
    try:
        fields = config.to_dict()
        for ignored in ("_name_or_path", "dtype", "torch_dtype"):
            fields.pop(ignored, None)
        content = json.dumps(fields, sort_keys=True, default=repr)
        plans_key = json.dumps(plans or {}, sort_keys=True, default=repr)
    except Exception:  # a config with fields json cannot write: build it every time
        return None
    return f"{type(config).__module__}.{type(config).__qualname__}", content, dtype, plans_key


def _read(config, dtype: str, plans) -> ModelTensors:
    import copy

    from ..layout import Layout
    from ..models import parts
    from ..models import structure as st

    config = copy.deepcopy(config)  # from_config writes the dtype into the config it is given
    try:
        s = st.structure(config, plans)
    except MpbookError as exc:
        raise MpbookError(f"{exc}; the planner counts the models mpbook can cut into stages") from None
    except (ValueError, KeyError) as exc:
        raise MpbookError(
            f"transformers has no causal LM for model_type {getattr(config, 'model_type', '?')!r} ({exc}); "
            "give the config of a causal LM"
        ) from None
    whole = parts.held_tensors(config, Layout(), 0, plans=plans, dtype=dtype)
    layers: list[list] = [[] for _ in range(s.num_layers)]
    for t in whole:
        if t.name.startswith(s.layer_prefix):
            layers[int(t.name[len(s.layer_prefix):].split(".", 1)[0])].append(t)
    by_name = {t.name: t.nbytes for t in whole}
    head_bytes = sum(by_name.get(t.shared_with, 0) if t.shared_with else t.nbytes for t in whole if t.kind == "head")
    split = [k.rsplit(".", 1)[-1] for k, v in s.layer_rules.items() if v not in ("replicate",)
             and not v.startswith(("replicated", "local", "mla"))]
    return ModelTensors(
        architecture=s.causal_lm_class,
        dtype=dtype,
        layers=tuple(tuple(layer) for layer in layers),
        split_names=tuple(dict.fromkeys(_short_name(n) for n in split)),
        layer_prefix=s.layer_prefix,
        head_bytes=head_bytes,
        config=config,
        plans=plans,
    )


def _short_name(path: str) -> str:
    """"q_proj" -> "q": the name the arithmetic lines use."""
    return path.removesuffix("_proj")


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
        config = config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        hidden = config.hidden_size
        intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                        or getattr(config, "ffn_dim", None) or 4 * hidden)
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=intermediate,
            vocab=config.vocab_size,
        )
