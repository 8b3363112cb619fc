"""Tensor parallelism, Megatron-style, with torch's DTensor ``parallelize_module``.

Inside each decoder layer the q/k/v and gate/up projections are split by output columns
(each rank computes its own attention heads and its slice of the MLP) and the o and down
projections by input rows (each rank holds a partial sum). A row-split output is a partial
sum, so it is all-reduced: two all-reduces per layer, one after attention, one after the
MLP. Splitting k/v by columns splits the KV heads too, so each rank caches only its heads.

The embedding, final norm and LM head stay replicated: they need no collective, so a
forward pass performs exactly 2 all-reduces per decoder layer and nothing else.
"""

from __future__ import annotations

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


def _styles(telemetry):
    """ParallelStyles for LAYER_PLAN whose row-split output reduction is counted and timed."""
    import time

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    class CountedRowwiseParallel(RowwiseParallel):
        def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
            # A row-split projection leaves each rank a partial sum of the output: the
            # redistribution to Replicate is the all-reduce that adds them up. It runs
            # synchronously here so that its time is the collective's, not the next op's.
            if outputs.placements != tuple(output_layouts):
                began = time.perf_counter()
                outputs = outputs.redistribute(placements=output_layouts)
                local = outputs.to_local() if use_local_output else outputs
                telemetry.collective("all_reduce", time.perf_counter() - began)
                return local
            return outputs.to_local() if use_local_output else outputs

    return {"colwise": ColwiseParallel, "rowwise": CountedRowwiseParallel}


def parallelize(stage, tp_mesh, telemetry) -> None:
    """Split every decoder layer of ``stage`` over ``tp_mesh`` by LAYER_PLAN, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    styles = _styles(telemetry)
    for layer in stage.model.layers:
        # src_data_rank=None: every rank loaded the same full weights and keeps its own
        # slice, so sharding needs no scatter from rank 0.
        plan = {path: styles[style]() for path, style in LAYER_PLAN.items()}
        parallelize_module(layer, tp_mesh, plan, src_data_rank=None)
