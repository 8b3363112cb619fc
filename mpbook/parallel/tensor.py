"""Tensor parallelism: transformers' parallel styles, done on plain local tensors.

A model's tensor-parallel plan (its config's ``base_model_tp_plan``, the CausalLM's head rule,
or a plan a user passes in the same format; :mod:`mpbook.models.structure` resolves it) names
a *style* per module or parameter: ``"model.layers.*.self_attn.q_proj": "colwise"``. A style
here has two halves, as transformers' ``TensorParallelLayer`` has (``shard_param`` /
``install_forward`` in ``transformers/distributed/tensor_parallel.py``):

- :func:`shard_pieces`: which slices of a parameter a rank keeps, so the loader reads only
  those from the safetensors files. Slices follow DTensor's ``Shard`` (``torch.chunk``): pieces
  of ceil(n / size), the last ones shorter (a vocabulary of 259 over 2 ranks: 130 + 129).
- :func:`install`: the module's forward, with the one explicit collective the style needs.

Megatron's layer plan in these terms: q/k/v and gate/up ``colwise`` (each rank computes its own
attention heads and its slice of the MLP; the KV cache holds only its heads), o and down
``rowwise`` (a partial sum on each rank: one all-reduce after attention, one after the MLP).
Under tensor parallel every family also gets a vocab-parallel token embedding
(``embedding_rowwise``: one all-reduce) and LM head (``colwise`` over the vocabulary: each rank
has the logits of its slice of the vocabulary; see :mod:`mpbook.parallel.vocab`).

Why not DTensor: its eager dispatch costs ~0.2 ms per sharded linear on CPU (10x more under
inference_mode), more than a decode step's compute in small and medium models. The shards are
the ones DTensor makes (checked in the tests).

Inference only: styles whose only job is gradient bookkeeping (``replicated_with_grad_allreduce``,
``mla_kv_a_proj``, ``local_params``, ``replicate``) change nothing here.
"""

from __future__ import annotations

from ..units import shard_range, shard_size

from typing import NamedTuple

COLWISE = frozenset({"colwise", "colwise_gather_output", "colwise_rep"})
ROWWISE = frozenset({"rowwise", "rowwise_split_input", "rowwise_rep"})
GATHER_OUTPUT = frozenset({"colwise_gather_output", "colwise_rep"})  # colwise, then all_gather the output
SPLIT_INPUT = frozenset({"rowwise_split_input", "rowwise_rep"})  # input arrives whole: take this rank's slice
PACKED = frozenset({"packed_colwise", "packed_rowwise"})
EMBEDDING = frozenset({"embedding_rowwise", "embedding_colwise"})
# Parameters kept whole (at inference these styles change nothing, or act on the module only).
WHOLE = frozenset({
    "replicate", "replicated_with_grad_allreduce", "local_params", "mla_kv_a_proj", "moe_tp_experts", "all_reduce",
    "moe_identity_expert", "ep_dispatch_experts",
})
EXPERT_SHARD = frozenset({"grouped_gemm"})  # expert parallel: whole experts per rank, dim 0 of the fused tensors
EXPERT_DISPATCH = "ep_dispatch_experts"  # the experts module under expert parallel (mpbook.parallel.expert)
IMPLEMENTED = COLWISE | ROWWISE | PACKED | EMBEDDING | WHOLE | EXPERT_SHARD


class Piece(NamedTuple):
    """Indices ``start:stop`` of dimension ``dim`` of a parameter (a negative dim counts from the end)."""

    dim: int
    start: int
    stop: int


def shard_piece(dim: int, n: int, rank: int, size: int) -> Piece:
    """This rank's slice of the ``n`` entries along ``dim``, cut as torch.chunk / DTensor's Shard cut them."""
    piece = shard_range(n, size, rank)
    return Piece(dim, piece.start, piece.stop)


def shard_sizes(n: int, size: int) -> list[int]:
    """Every rank's share of ``n`` entries, cut as :func:`shard_piece` cuts them."""
    return [shard_size(n, size, r) for r in range(size)]


def unsupported(style: str, where: str) -> NotImplementedError:
    return NotImplementedError(f"parallel style {style!r} on {where} is not one mpbook implements")


def shard_pieces(style: str, leaf: str, shape: tuple[int, ...], rank: int, size: int, *,
                 transposed: bool = False) -> list[Piece]:
    """The slices of a parameter called ``leaf`` (``weight``, ``bias``, ``gate_up_proj``, ...) of
    full ``shape`` that ``rank`` of ``size`` keeps under ``style``; [] keeps all of it.

    Pieces on one dim are concatenated in order; pieces on different dims all apply.
    ``transposed``: the weight is (in, out), as GPT-2's ``Conv1D`` stores it, not (out, in)."""
    if style not in IMPLEMENTED:
        raise unsupported(style, leaf)
    if style in WHOLE or size == 1:
        return []
    ndim = len(shape)
    bias = leaf.rsplit(".", 1)[-1].endswith("bias") or ndim == 1
    out_dim = ndim - 1 if (bias or transposed) else ndim - 2  # (out, in), a 3-D expert (E, out, in), or a bias (out,)
    in_dim = ndim - 2 if transposed else ndim - 1
    if style in COLWISE:
        return [shard_piece(out_dim, shape[out_dim], rank, size)]
    if style in ROWWISE:
        if bias:  # added once, after the all-reduce: every rank keeps it whole
            return []
        return [shard_piece(in_dim, shape[in_dim], rank, size)]
    if style in PACKED:
        # Two tensors packed along one dim ([gate; up]): this rank's slice of EACH half, so the local
        # tensor is again [gate_r; up_r] and the module's own chunk(2) still splits it (DTensor's
        # _StridedShard(split_factor=2)). transformers cuts a 1-D packed bias with a plain Shard(-1)
        # instead (gate on rank 0, up on rank 1); here a bias keeps the packed layout too.
        dim = out_dim if style == "packed_colwise" else in_dim
        if bias and style == "packed_rowwise":
            return []
        half = shape[dim] // 2
        mine = shard_range(half, size, rank)
        return [Piece(dim, mine.start, mine.stop), Piece(dim, half + mine.start, half + mine.stop)]
    if style == "embedding_rowwise":  # vocab-parallel: rows of the (vocab, hidden) table
        return [shard_piece(0, shape[0], rank, size)]
    if style == "embedding_colwise":  # hidden-parallel: columns
        return [shard_piece(1, shape[1], rank, size)]
    if style in EXPERT_SHARD:
        if shape[0] % size:
            raise ValueError(f"{shape[0]} experts do not split evenly over {size} expert-parallel ranks")
        per = shape[0] // size
        return [Piece(0, rank * per, (rank + 1) * per)]
    raise AssertionError(style)


# Styles whose forward stays the module's own: colwise (the output stays split on its last
# dim, as the next, rowwise, layer wants it); the others are parameter-only, or bookkeeping
# for gradients.
OWN_FORWARD = frozenset({"colwise"}) | PACKED | EXPERT_SHARD | (
    WHOLE - {"moe_tp_experts", "all_reduce", "moe_identity_expert"})


def install(module, style: str, group, full_shapes: dict[str, tuple[int, ...]], *, name: str = "") -> None:
    """Give ``module`` (already holding its local shards) the forward ``style`` needs.

    ``group``: a :class:`mpbook.parallel.collectives.Group` (the tensor-parallel group);
    ``full_shapes``: the unsharded shape of each of the module's own parameters."""
    if style in OWN_FORWARD:
        return
    if style in GATHER_OUTPUT:
        module.forward = _gather_output(module, group, full_shapes)
    elif style in ROWWISE:
        module.forward = _rowwise(module, group, full_shapes, split=style in SPLIT_INPUT,
                                  where=name or type(module).__name__, style=style)
    elif style == "embedding_rowwise":
        module.forward = _vocab_parallel_embedding(module, group, full_shapes)
    elif style == "embedding_colwise":
        module.forward = _hidden_parallel_embedding(module, group, full_shapes)
    elif style in ("moe_tp_experts", "all_reduce"):
        module.forward = _sum_partials(module, group)
    elif style == "moe_identity_expert":
        module.forward = _pre_divided(module, group)
    else:
        raise unsupported(style, name or type(module).__name__)


def _gather_output(module, group, full_shapes):
    weight = full_shapes["weight"]
    sizes = shard_sizes(weight[-1] if _transposed(module) else weight[0], group.size)
    original = module.forward

    def gather_output(x):
        # Column-split output: each rank holds some output features; gather them all.
        return group.all_gather_last_dim(original(x), sizes)

    return gather_output


def _rowwise(module, group, full_shapes, *, split: bool, where: str, style: str):
    """``split``: the input arrives whole, and this rank keeps the features its weight rows read."""
    import torch

    transposed = _transposed(module)
    if not (isinstance(module, torch.nn.Linear) or transposed):
        raise unsupported(style, f"{where} (a {type(module).__name__}, not a linear layer)")
    from ..models.packed_linear import WRAPPED, product

    weight = full_shapes["weight"]
    mine = shard_range(weight[0] if transposed else weight[-1], group.size, group.rank)
    start, stop = mine.start, mine.stop
    if not transposed:  # its product goes through packed_linear.product: a CPU run may pack it
        setattr(module, WRAPPED, True)

    def rowwise(x):
        if split:  # the input is whole: keep the features this rank's weight rows read
            x = x[..., start:stop]
        # Row-split weight: each rank's product is a partial sum over its slice of the inner
        # dimension, so all-reduce; the bias is added once, after the sum.
        out = x @ module.weight if transposed else product(module, x)
        out = group.all_reduce(out)
        return out if module.bias is None else out + module.bias

    return rowwise


def _vocab_parallel_embedding(module, group, full_shapes):
    mine = shard_range(full_shapes["weight"][0], group.size, group.rank)
    start, stop = mine.start, mine.stop
    # padding_idx only steers gradients, but F.embedding insists it index the local table.
    pad = getattr(module, "padding_idx", None)
    if pad is not None:
        module.padding_idx = pad - start if start <= pad < stop else None
    original = module.forward

    def vocab_parallel_embedding(ids):
        # Each rank holds vocabulary rows start:stop. Look up the ids it holds (the others read
        # row 0 and are zeroed), then sum: every id is found on exactly one rank. The module's
        # own forward runs, so a scaled embedding (Gemma) keeps its scale.
        outside = (ids < start) | (ids >= stop)
        local = (ids - start).masked_fill(outside, 0)
        out = original(local).masked_fill(outside.unsqueeze(-1), 0.0)
        return group.all_reduce(out)

    return vocab_parallel_embedding


def _hidden_parallel_embedding(module, group, full_shapes):
    sizes = shard_sizes(full_shapes["weight"][1], group.size)
    original = module.forward

    def hidden_parallel_embedding(ids):
        # Each rank looks up its slice of every vector; gather the slices.
        return group.all_gather_last_dim(original(ids), sizes)

    return hidden_parallel_embedding


def _sum_partials(module, group):
    original = module.forward

    def sum_partials(*args, **kwargs):
        # Every rank ran its slice of every expert's inner dimension (or of the module's):
        # partial sums, so all-reduce.
        out = original(*args, **kwargs)
        return None if out is None else group.all_reduce(out)

    return sum_partials


def _pre_divided(module, group):
    original = module.forward
    size = group.size

    def pre_divided(x, *args, **kwargs):
        # An identity "expert" gives the same value on every rank, and the experts' all-reduce
        # would count it size times: divide first.
        return original(x / size, *args, **kwargs)

    return pre_divided


def _transposed(module) -> bool:
    """GPT-2 style ``Conv1D``: weight (in, out), ``y = x @ W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
