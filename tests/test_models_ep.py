"""Expert parallel combined with the other degrees on 4 real engines, against one device:
Mixtral and Qwen3-MoE tiny checkpoints, left-padded prompts of different lengths."""

from __future__ import annotations

import pytest

from test_models import LAYERS, MOE_LAYERS, PROMPTS, forward_checked, generate_checked

pytestmark = pytest.mark.cluster

CASES = [
    ("mixtral", "tensor", {"ep": 2}),  # tp=2 x ep=2: experts split both ways, one all-reduce per MoE layer
    ("mixtral", "pipeline", {"ep": 2}),  # pp=2 x ep=2
    ("mixtral", "expert", {}),  # %%mp expert: its own degree takes every engine, ep=4, one expert per rank
    ("qwen3_moe", "tensor", {"ep": 2}),
    ("qwen3_moe", "data", {"ep": 2}),  # dp=2 x ep=2
]


def expected_all_reduces(model_type: str, layout) -> int:
    """Per rank of a stage, one forward pass."""
    moe = MOE_LAYERS[model_type] // layout.pp if model_type == "mixtral" else MOE_LAYERS[model_type]
    if layout.tp > 1:
        # attention's row-split output, the MoE (experts of other ep ranks and slices of other tp
        # ranks in ONE all-reduce over ep x tp), the dense MLP layer, the vocab-parallel embedding
        return LAYERS + moe + (LAYERS - moe) + 1
    return moe


@pytest.mark.parametrize("model_type, strategy, degrees", CASES,
                         ids=[f"{mt}-{s}-{'-'.join(f'{k}{v}' for k, v in d.items())}" for mt, s, d in CASES])
def test_expert_parallel_combinations_match_one_device(wb4, model_type, strategy, degrees):
    forward = forward_checked(wb4, model_type, strategy, degrees)
    layout = forward.layout
    for rank, counts in enumerate(forward.collectives):
        if forward.layout.dp > 1 and layout.coords(rank).dp >= len(PROMPTS):
            continue
        assert counts.get("all_reduce", 0) == expected_all_reduces(model_type, layout), (rank, counts)
    generate_checked(wb4, model_type, strategy, degrees)
