"""What mpbook needs from transformers beyond its public API (checked against 5.24).

- a config's attention and experts implementations: ``config._attn_implementation`` and
  ``config._experts_implementation`` (properties, set from ``attn_implementation=`` /
  ``experts_implementation=``; no public getter);
- a CausalLM class's own pipeline plan for its head, ``_pp_plan`` (the config carries only the
  base model's, ``base_model_pp_plan``);
- the family's initialisation of one module, ``PreTrainedModel._init_weights(module)`` (the
  public ``initialize_weights()`` walks the whole model): it fills the buffers no checkpoint
  holds (RoPE frequencies, embedding scales);
- a fused experts module told that it holds a slice of the experts, ``_is_expert_parallel``
  (read by the ``batched_mm`` and ``grouped_mm`` experts implementations);
- how checkpoint keys become parameters: the internal modules ``conversion_mapping``
  (``get_model_conversion_mapping``) and ``core_model_loading`` (``rename_source_key``,
  ``dot_natural_key``, ``WeightConverter`` and its operations ``MergeModulelist`` /
  ``Concatenate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

CHECKED = "5.24"


def attn_implementation(config) -> str | None:
    """The attention implementation the config selects ("eager", "sdpa", ...), None if unset."""
    return getattr(config, "_attn_implementation", None)


def experts_implementation(config) -> str | None:
    """The fused experts implementation the config selects ("eager", "batched_mm", ...), or None."""
    return getattr(config, "_experts_implementation", None)


def head_pp_plan(model) -> dict:
    """The CausalLM class's own pipeline plan (its head: ``lm_head`` -> inputs, outputs), {} if none."""
    return dict(getattr(type(model), "_pp_plan", None) or {})


def init_weights(model, module) -> None:
    """Initialise ``module`` (a part of ``model``) as the family does, buffers included."""
    model._init_weights(module)


def mark_expert_parallel(experts) -> None:
    """Tell a fused experts module that expert ids >= its ``num_experts`` are off-rank sentinels."""
    experts._is_expert_parallel = True


def checkpoint_targets(model, keys: Iterable[str]) -> Iterator[tuple[str, str, str | None, list[str], list]]:
    """For each checkpoint key of ``model``, in natural order (experts 0, 1, ..., 10): the
    parameter it builds, the converter's source pattern it matched (None for a plain, maybe
    renamed, tensor), and that converter's source patterns and operations ([] and [] if none).
    Uses transformers' own conversion mapping, so a family's renamings and fusions apply."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = dict.fromkeys(model.state_dict(), True)
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if pattern is None:
            yield key, target, None, [], []
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        yield key, target, pattern, list(converter.source_patterns), list(converter.operations)


def fused_experts_dim(operations: list) -> int | None:
    """0 for MergeModulelist(0) alone (stacked experts); c for MergeModulelist(0) then
    Concatenate(c); None for anything else."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = operations
    if len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
        if len(ops) == 1:
            return 0
        if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim > 0:
            return ops[1].dim
    return None


def convert(operations: list, tensors: dict[str, list[Any]], patterns: list[str], name: str) -> Any:
    """Apply a converter's ``operations`` to the source tensors (pattern -> tensors) of parameter
    ``name``, as transformers' loading does; the converted tensor."""
    for op in operations:
        tensors = op.convert(tensors, source_patterns=patterns, target_patterns=[name], full_layer_name=name)
    return next(iter(tensors.values()))


def verify() -> None:
    """Raise with a clear message if this transformers lacks what the adapter uses.

    Builds a two-expert Mixtral on the meta device and checks each name against it: the
    config's implementations, the class's head plan, ``_init_weights`` filling a rotary
    buffer, the experts module reading ``_is_expert_parallel``, and a per-expert checkpoint key
    mapped to the fused ``gate_up_proj`` by MergeModulelist(0) then Concatenate(1).
    """
    import inspect

    import torch
    import transformers

    problems = []
    try:
        config = transformers.MixtralConfig(
            vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
            attn_implementation="eager", experts_implementation="batched_mm",
        )
        if attn_implementation(config) != "eager":
            problems.append(f"config._attn_implementation is {attn_implementation(config)!r} for attn_implementation='eager'")
        if experts_implementation(config) != "batched_mm":
            problems.append(f"config._experts_implementation is {experts_implementation(config)!r} "
                            "for experts_implementation='batched_mm'")
        with torch.device("meta"):
            model = transformers.MixtralForCausalLM(config)
        if "lm_head" not in head_pp_plan(model):
            problems.append("MixtralForCausalLM._pp_plan no longer names lm_head")
        rotary = model.model.rotary_emb
        rotary.inv_freq = torch.zeros_like(rotary.inv_freq, device="cpu")
        init_weights(model, rotary)
        if not bool((rotary.inv_freq > 0).all()):
            problems.append("_init_weights(rotary embedding) no longer fills inv_freq")
        experts = model.model.layers[0].mlp.experts
        from transformers.integrations import moe

        if "_is_expert_parallel" not in inspect.getsource(moe):
            problems.append("the experts implementations no longer read _is_expert_parallel")
        mark_expert_parallel(experts)
        key = "model.layers.0.mlp.experts.1.w1.weight"
        found = {k: (target, ops) for k, target, _, _, ops in checkpoint_targets(model, [key])}
        target, ops = found[key]
        if target != "model.layers.0.mlp.experts.gate_up_proj" or fused_experts_dim(ops) != 1:
            problems.append(f"the checkpoint key {key} now builds {target} with {ops}")
    except (ImportError, AttributeError, TypeError, KeyError, StopIteration) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.transformers was checked against transformers {CHECKED}; "
            f"transformers {transformers.__version__} differs: {'; '.join(problems)}"
        )
