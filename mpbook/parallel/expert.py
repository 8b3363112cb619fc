"""Expert parallelism for mixture-of-experts models: each rank holds only its own experts.

The model's own plan says which tensors are experts (its config's ``base_model_ep_plan``:
``grouped_gemm`` on the fused expert weights, ``ep_dispatch_experts`` on the experts module).
With ``ep`` expert-parallel ranks, rank e keeps experts ``e * E/ep .. (e+1) * E/ep`` (dim 0 of
the fused tensors; the loader reads only those from the checkpoint) and the router runs whole
on every rank.

Every rank of an expert group holds the same tokens: ep ranks share a replica and a pipeline
stage, and attention is replicated over them (split over tp, if any). So no token has to move
to reach its expert. Each rank runs the experts' own forward on every token, with the routes to
other ranks' experts masked (their local id becomes ``num_local_experts``, a sentinel the
experts forward skips, and their weight 0), and **one all-reduce per MoE layer** sums the
ranks' partial outputs: transformers' ``AllReduceEP``. Why an all-reduce and not all-to-all:
all-to-all dispatch would move each token to the ranks of its experts and back (two collectives,
plus the split sizes each way, and a host sync to read them) to save work that only exists when
ranks hold different tokens; here they hold the same ones, and the all-reduce of (tokens,
hidden) per layer is what tensor parallel pays per MoE layer too.

Combined with tensor parallel (``ep`` x ``tp``), the experts follow the model's tp plan as well
(``packed_colwise`` gate_up, ``rowwise`` down: each of a rank's experts is also split over its
tp group), and the one all-reduce runs over the ep x tp group: it sums both the experts of other
ep ranks and the partial products of other tp ranks, where plain tensor parallel would pay one
(``moe_tp_experts``) and expert parallel another.
"""

from __future__ import annotations

from typing import Any

from ..compat import transformers as hf_compat


def install_dispatch(experts, *, ep_rank: int, group, telemetry: Any = None, load=None, device="cpu") -> None:
    """Mask off-rank routes and sum the experts' output over ``group`` (one all-reduce).

    ``experts.num_experts`` is already the local count; ``group``: a
    :class:`mpbook.parallel.collectives.Group` over the ranks whose partial outputs add up
    (the ep group, or the ep x tp group). ``telemetry``'s expert counter receives the routes
    that reached this rank's experts (on ``device``, the experts' own); ``load`` (a
    (num_local,) int64 tensor), if given, accumulates them per local expert."""
    import torch

    n_local = experts.num_experts
    original = experts.forward
    # Added to in place: no host sync here, and one tensor to a compiled step (telemetry reads it).
    routes = None if telemetry is None else telemetry.expert_counter(device)

    def dispatch(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        off_rank = (top_k_index // n_local) != ep_rank
        local_index = torch.where(off_rank, n_local, top_k_index % n_local)
        if routes is not None:
            routes.add_((~off_rank).sum())
        if load is not None:
            bins = torch.zeros(n_local + 1, dtype=torch.long, device=local_index.device)
            bins.index_add_(0, local_index.flatten(), torch.ones_like(local_index.flatten()))
            load.add_(bins[:n_local])
        out = original(hidden_states, local_index, top_k_weights.masked_fill(off_rank, 0.0), *args, **kwargs)
        # Each rank added only its experts' contributions (and, with tp, its slice of each): sum them.
        return group.all_reduce(out)

    experts.forward = dispatch


def mark_local(experts, n_local: int) -> None:
    """Tell a fused experts module it holds ``n_local`` experts of a split set: ids >= n_local
    are off-rank sentinels. Eager experts need only ``num_experts`` (they one-hot over
    num_experts + 1 and skip the last); batched_mm and grouped_mm need to be told they hold a
    slice (:func:`mpbook.compat.transformers.mark_expert_parallel`): without it batched_mm
    indexes the local weights with the sentinel, and grouped_mm's GPU kernel leaves the
    sentinel rows uninitialised."""
    experts.num_experts = n_local
    hf_compat.mark_expert_parallel(experts)
