"""Tensor parallelism, Megatron-style: each decoder layer's weight matrices split over tp ranks.

Inside each decoder layer the q/k/v and gate/up projections are split by output columns
(each rank computes its own attention heads and its slice of the MLP) and the o and down
projections by input rows (each rank holds a partial sum). A row-split output is a partial
sum, so it is all-reduced: two all-reduces per layer, one after attention, one after the
MLP. Splitting k/v by columns splits the KV heads too, so each rank caches only its heads.

The embedding, final norm and LM head stay replicated: they need no collective, so a
forward pass performs exactly 2 all-reduces per decoder layer and nothing else.

The plan is applied by slicing each weight into a plain local tensor (exactly the shards
DTensor's ColwiseParallel/RowwiseParallel make: Shard(0) / Shard(1), checked against it in
the tests) as the stage loads, so a rank reads only its slices from the checkpoint and holds
only its shard; the all-reduce is an explicit ``dist.all_reduce`` in a forward hook. DTensor's
``parallelize_module`` gives the same numbers, but its eager dispatch costs ~0.2 ms per sharded
linear (measured here on CPU; 10x more under inference_mode), more than a decode step's
compute in small and medium models: a decode step would pay it 4 times per layer.
"""

from __future__ import annotations

import time

from ..errors import MpbookError

# Module paths inside one decoder layer -> how its weight is split.
LAYER_PLAN: dict[str, str] = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}

ALL_REDUCES_PER_LAYER = sum(1 for style in LAYER_PLAN.values() if style == "rowwise")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_tp(config, tp: int) -> None:
    """tp must divide the query heads, the KV heads and the MLP width; say which values do."""
    if tp == 1:
        return
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = config.intermediate_size
    for what, n in (("attention heads", heads), ("KV heads", kv_heads), ("MLP width (intermediate_size)", width)):
        if n % tp:
            valid = [d for d in divisors(heads) if kv_heads % d == 0 and width % d == 0]
            raise MpbookError(
                f"tp={tp} does not divide the {n} {what} of this model "
                f"({heads} attention heads, {kv_heads} KV heads); choose tp in {{{', '.join(map(str, valid))}}}"
            )


def shard_linear(linear, style: str, tp_rank: int, tp: int):
    """Keep this rank's slice of ``linear``, in place.

    A row-split layer's bias must be added once, after the all-reduce, not once per rank:
    it moves to the parameter ``bias_after_reduce`` (every rank holds it) that the hook adds."""
    import torch

    weight = linear.weight  # real, or on the meta device before loading
    dim = 0 if style == "colwise" else 1  # nn.Linear weight is (out_features, in_features)
    local = weight.chunk(tp, dim=dim)[tp_rank].clone()
    linear.weight = torch.nn.Parameter(local, requires_grad=False)
    if style == "colwise":
        linear.out_features = local.shape[0]
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.chunk(tp, dim=0)[tp_rank].clone(), requires_grad=False)
        return
    linear.in_features = local.shape[1]
    bias, linear.bias = linear.bias, None
    linear.register_parameter("bias_after_reduce", bias)


def _all_reduce_after(group, telemetry):
    import torch.distributed as dist

    def hook(module, inputs, output):
        # Row-split projection: each rank holds a partial sum of the output; add them up.
        began = time.perf_counter()
        dist.all_reduce(output, group=group)
        telemetry.collective("all_reduce", time.perf_counter() - began)
        bias = module.bias_after_reduce
        return output if bias is None else output + bias

    return hook


def connect(stage, tp_group, telemetry) -> None:
    """Add the all-reduce after every row-split projection of ``stage``, whose layers were
    loaded already sharded (``models.load_stage(..., tp_rank=, tp=)``, by :func:`shard_linear`)."""
    for layer in stage.model.layers:
        for path, style in LAYER_PLAN.items():
            if style == "rowwise":
                layer.get_submodule(path).register_forward_hook(_all_reduce_after(tp_group, telemetry))
