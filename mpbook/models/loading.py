"""Loading the part of a model that a rank needs, reading only its tensors, and running the
family's OWN forward code on it.

What each rank holds comes from :mod:`mpbook.models.structure` (the model's own plans): its
pipeline stage's decoder layers, cut from the CausalLM built on the meta device, and under
tensor / expert parallel only its slices of them, read from the safetensors files
(:mod:`mpbook.models.checkpoint`). The styles' forwards and collectives come from
:mod:`mpbook.parallel.tensor` and :mod:`mpbook.parallel.expert`.

How a stage runs (:class:`Stage`):

- The first stage runs the base model's forward from ``input_ids``. A later stage runs the same
  forward with ``inputs_embeds`` = zeros, and a forward pre-hook on its first decoder layer swaps
  in the received hidden states: the glue between embedding and layers (Gemma's normalizer,
  Granite's embedding multiplier, mask and rotary creation) runs as the family wrote it, yet
  cannot touch the received activation.
- Layers are renumbered from 0 and the config sliced to them (``num_hidden_layers``,
  ``layer_types``), so the stage's own cache and masks (sliding windows included) see exactly
  the layers it holds. transformers' own pipeline keeps global indices; a later stage's cache
  then reports its length from a layer it does not hold, and left-padded batches come out wrong.
- A non-last stage returns ``last_hidden_state``; the last stage runs the CausalLM forward, so
  the family's logit post-processing (Gemma 2's softcapping, Granite's logit scaling) applies.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..compat import transformers as hf_compat
from ..errors import MpbookError
from ..units import shard_range
from . import decode_mask
from .source import checkpoint_files, resolve


@dataclass
class Stage:
    """One rank's part of a causal LM, with the forward that runs the family's own code."""

    model: Any  # the CausalLM, cut down to this rank's stage and shards
    first: bool
    last: bool
    layers: range
    structure: Any = None  # mpbook.models.structure.Structure (None: a whole model from from_pretrained)
    # The vocabulary slice [start, stop) of this rank's logits when the head is split over tp.
    vocab: tuple[int, int] | None = None
    expert_load: dict[str, Any] = field(default_factory=dict)  # MoE module -> routes per local expert
    # A whole model whose layers keep a recurrent state (state-space, linear attention): its
    # inputs go through the model's own prepare_inputs_for_generation, which knows, for example,
    # that Mamba wants no attention mask after the prompt.
    recurrent: bool = False
    _incoming: Any = None
    _prefilled: dict = field(default_factory=dict)  # id of each cache that has seen its prompt -> weak ref

    def __post_init__(self):
        s = self.structure
        self.base = self.model.get_submodule(s.base_prefix) if s is not None and s.base_prefix else self.model
        self.position_offset = position_offset(self.model)
        # A decode step's 4D mask made here (models.decode_mask): "sdpa" or "eager", None where
        # the family's forward makes it.
        self.step_mask_kind = None if self.recurrent else decode_mask.kind_for(self.model)
        if not self.first:
            container = self.base.get_submodule(s.layers)
            container[0].register_forward_pre_hook(self._swap_in_received, with_kwargs=True)

    @property
    def config(self):
        return self.model.config

    def _swap_in_received(self, module, args, kwargs):
        """Before the first local layer: the received activation replaces whatever the glue
        code made of the zero placeholder (positional or keyword, as the family passes it)."""
        if self._incoming is None:
            return None
        if args:
            return (self._incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._incoming}

    def new_cache(self, max_length: int | None = None):
        """An empty KV cache of this stage's layers: one that grows (transformers' DynamicCache),
        or with ``max_length``, one allocated for that many positions and written in place
        (StaticCache, for a compiled decode step: :mod:`mpbook.engine.compiled`)."""
        if max_length is not None:
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=max_length)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, x, attention_mask, position_ids, cache, *, logits_to_keep: int = 1):
        """Token ids (first stage) or hidden states in; hidden states (b, q, hidden) or the last
        ``logits_to_keep`` positions' logits (last stage; 0 keeps all) out."""
        import torch

        if self.position_offset:
            position_ids = position_ids + self.position_offset

        if self.recurrent:
            first = id(cache) not in self._prefilled  # the prompt: this cache's first forward
            self._prefilled[id(cache)] = weakref.ref(cache, lambda _, key=id(cache): self._prefilled.pop(key, None))
            inputs = self.model.prepare_inputs_for_generation(
                x, cache=cache, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                is_first_iteration=first, logits_to_keep=logits_to_keep)
            if "logits_to_keep" in inputs:  # Falcon-H1's preparation puts its config's count there
                inputs["logits_to_keep"] = logits_to_keep
            return self.model(**inputs).logits
        if (self.step_mask_kind is not None and x.shape[1] == 1 and attention_mask is not None
                and attention_mask.dim() == 2 and not torch.compiler.is_compiling()):
            attention_mask = decode_mask.for_one_token(attention_mask, self.step_mask_kind, self.model.dtype)
        common = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        if self.first:
            inputs = {"input_ids": x}
        else:
            inputs = {"inputs_embeds": torch.zeros_like(x)}  # a placeholder: the hook swaps x in
            self._incoming = x
        try:
            if self.last:
                return self.model(**inputs, **common, logits_to_keep=logits_to_keep).logits
            return self.base(**inputs, **common).last_hidden_state
        finally:
            self._incoming = None

    def param_bytes(self) -> int:
        """Bytes of the parameters this rank holds (a tied matrix counts once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def position_offset(model) -> int:
    """Where a model's positions start: RoBERTa's family keeps its padding index as a row of its
    position table and numbers a prompt's tokens from the row after it (transformers'
    create_position_ids_from_input_ids), where mpbook numbers them from 0."""
    import torch

    for name, module in model.named_modules():
        if (name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding)
                and module.padding_idx is not None):
            return module.padding_idx + 1
    return 0


def load_whole(model: str | os.PathLike, *, dtype, device, attention: str | None = None):
    """The whole model with transformers' own loader, from safetensors only, with the attention
    implementation transformers picks for it (Gemma 2: eager) unless ``attention`` says."""
    from transformers import AutoModelForCausalLM

    folder = resolve(model)
    checkpoint_files(folder)  # a clear error when there is no safetensors checkpoint
    kwargs = {"attn_implementation": attention} if attention else {}
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **kwargs)
    except ValueError as exc:
        if attention and "attn" in str(exc).lower():
            raise MpbookError(f"--attn {attention}: this model cannot use it ({str(exc).splitlines()[0]})") from None
        raise
    return lm.to(device).eval().requires_grad_(False)


def whole_stage(model, *, dtype, device, attention: str | None = None) -> Stage:
    """The whole model as one stage (data parallel: nothing split), for any causal LM."""
    from .support import recurrent_state

    lm = load_whole(model, dtype=dtype, device=device, attention=attention)
    return Stage(lm, first=True, last=True, layers=range(lm.config.get_text_config().num_hidden_layers),
                 recurrent=recurrent_state(lm.config))


def load_stage(model: str | os.PathLike, *, layout, coords, dtype, device, group=None,
               stage_sizes=None, plans: dict | None = None, attention: str | None = None,
               telemetry: Any = None) -> Stage:
    """Build the rank at ``coords`` of ``layout``: its stage, its shards, their collectives.

    ``group(dims)``: this rank's :class:`mpbook.parallel.collectives.Group` along mesh ``dims``
    (("tp",), ("ep",), ("ep", "tp")); making one is a step every rank takes together, so they
    are asked for in the same order on every rank (:func:`mpbook.models.parts.groups_needed`),
    before anything loads. ``telemetry`` receives the experts' load."""
    from transformers import AutoConfig

    from . import parts, support
    from . import structure as st
    from .checkpoint import Checkpoint

    folder = resolve(model)
    config = AutoConfig.from_pretrained(folder)
    support.check_layout(config, layout, plans, stage_sizes=stage_sizes)
    lm = st.meta_model(config, attention=attention, dtype=dtype)
    s = st.structure(lm, plans)
    groups = {dims: group(dims) for dims in parts.groups_needed(s, layout)}
    ckpt = Checkpoint(folder, lm)  # indexed against the whole model's names, before it is cut
    part = parts.rank_part(s, layout, coords, stage_sizes=stage_sizes)
    parts.cut_stage(lm, s, part)

    tied = _untie(lm, s)
    _make_buffers(lm, device)
    parts.narrow_config(lm.config, part.layers)
    pieces_of, full_shapes = _read_parameters(lm, s, part, ckpt, device=device, folder=folder)
    _read_buffers(lm, s, part, ckpt, device=device)
    ckpt.close()
    _tie_again(lm, tied, pieces_of)
    _sizes_follow_shards(lm)
    stage = Stage(lm, first=part.first, last=part.last, layers=part.layers, structure=s)
    _install_collectives(stage, part, groups, full_shapes, telemetry=telemetry, device=device)
    _check_loaded(lm, folder)
    lm.eval().requires_grad_(False)
    return stage


def _untie(lm, s) -> list[tuple[str, str]]:
    """Tied weights are untied for loading (each side may be sliced by its own rule), and tied
    again by :func:`_tie_again` when both sides hold the same slice. A parameter or buffer is
    replaced by assigning it (nn.Module's setattr keeps it registered as what it was, a
    buffer's persistence included). Returns the (target, source) pairs untied."""
    import torch

    from . import parts

    tied = []
    for target, source in s.tied.items():
        t_owner, t_leaf = _owner(lm, target)
        s_owner, s_leaf = _owner(lm, source)
        if t_owner is None or s_owner is None or isinstance(t_owner, parts.Absent) or isinstance(s_owner, parts.Absent):
            continue
        setattr(t_owner, t_leaf, torch.nn.Parameter(torch.empty_like(getattr(t_owner, t_leaf))))
        tied.append((target, source))
    return tied


def _make_buffers(lm, device) -> None:
    """Buffers are in no checkpoint, or only some (RoPE frequencies, Gemma's embedding scale):
    make them real and let the family's own initialisation fill them, before the parameters
    are loaded (it re-initialises the owner's parameters too: harmless while they are on meta)
    and before the config is cut (a rotary embedding may read every layer type)."""
    import torch

    owners = {}
    for name, buffer in list(lm.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = lm.get_submodule(owner_name)
        setattr(owner, leaf, torch.empty_like(buffer, device=device))
        owners[owner_name] = owner
    with torch.no_grad():
        for owner in owners.values():
            hf_compat.init_weights(lm, owner)


def _read_parameters(lm, s, part, ckpt, *, device, folder) -> tuple[dict, dict[str, dict[str, tuple]]]:
    """This rank's slice of each parameter, from the checkpoint. Returns the pieces read per
    parameter and the full (checkpoint) shapes per module, which the styles' forwards need."""
    import torch

    from ..parallel import expert, tensor
    from . import parts
    from . import structure as st

    pieces_of = {}
    full_shapes: dict[str, dict[str, tuple]] = {}
    for name, param in list(lm.named_parameters()):
        source = parts.global_name(s, part, name)
        if source not in ckpt and source in s.tied:
            source = s.tied[source]  # a tied head with no tensor of its own
        if source not in ckpt:
            raise MpbookError(f"{folder}: the checkpoint has no tensor {source} (needed for {name})")
        owner_name, _, leaf = name.rpartition(".")
        owner = lm.get_submodule(owner_name)
        full = ckpt.shape(source)
        pieces = part.pieces(name, full, transposed=tensor._transposed(owner))
        pieces_of[name] = pieces
        local = ckpt.read(source, pieces).to(device=device, dtype=param.dtype)
        setattr(owner, leaf, torch.nn.Parameter(local, requires_grad=False))
        full_shapes.setdefault(owner_name, {})[leaf] = full
        if part.ep > 1 and st.param_rule(name, part.ep_plan) in tensor.EXPERT_SHARD and hasattr(owner, "num_experts"):
            expert.mark_local(owner, local.shape[0])
    return pieces_of, full_shapes


def _read_buffers(lm, s, part, ckpt, *, device) -> None:
    """The persistent buffers a checkpoint holds, read over the ones made by :func:`_make_buffers`."""
    from . import parts

    for name, buffer in list(lm.named_buffers()):
        source = parts.global_name(s, part, name)
        if source in ckpt:
            owner_name, _, leaf = name.rpartition(".")
            setattr(lm.get_submodule(owner_name), leaf, ckpt.read(source).to(device=device, dtype=buffer.dtype))


def _tie_again(lm, tied, pieces_of) -> None:
    """Tie again the pairs :func:`_untie` untied whose two sides hold the same slice."""
    for target, source in tied:
        if pieces_of.get(target) == pieces_of.get(source):
            t_owner, t_leaf = _owner(lm, target)
            setattr(t_owner, t_leaf, lm.get_parameter(source))


def _sizes_follow_shards(lm) -> None:
    """Size attributes follow the local shards (transformers 5 attention reshapes with -1 and
    reads none of them, but a printed module should not lie; Conv1D does read its nf)."""
    import torch

    from ..parallel import tensor

    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif tensor._transposed(module):  # GPT-2's Conv1D shapes its output from nf
            module.nx, module.nf = module.weight.shape


def _install_collectives(stage: Stage, part, groups, full_shapes, *, telemetry, device) -> None:
    """The forwards the styles need: the collectives, and the vocabulary slice of a
    column-split head."""
    import torch

    from ..parallel import expert, tensor
    from . import parts

    s = stage.structure
    for name, module in list(stage.model.named_modules()):
        style, kind = part.rule(name, param=False)
        if style is None or isinstance(module, parts.Absent):
            continue
        if style == tensor.EXPERT_DISPATCH:
            load = stage.expert_load[name] = torch.zeros(module.num_experts, dtype=torch.long, device=device)
            expert.install_dispatch(module, ep_rank=part.ep_rank, group=groups[part.experts_reduce],
                                    telemetry=telemetry, load=load, device=device)
        elif kind == "tp":
            tensor.install(module, style, groups[("tp",)], full_shapes.get(name, {}), name=name)
    if part.tp > 1 and part.last and s.head and all(part.tp_plan.get(h) == "colwise" for h in s.head):
        mine = shard_range(s.vocab_size, part.tp, part.tp_rank)
        stage.vocab = (mine.start, mine.stop)


def _check_loaded(lm, folder) -> None:
    """Every parameter and buffer real: a tensor left on meta had no weights in the checkpoint."""
    leftover = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if leftover:
        raise MpbookError(f"{folder}: no weights were found for {', '.join(leftover[:5])}")


def _owner(model, name: str):
    owner_name, _, leaf = name.rpartition(".")
    try:
        return model.get_submodule(owner_name), leaf
    except AttributeError:
        return None, leaf
