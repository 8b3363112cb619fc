"""The planner's prediction against what real engines hold, on CPU engines."""

from __future__ import annotations

import pytest

import mpbook
from mpbook import Workbench

pytestmark = pytest.mark.cluster

# Equal lengths, so that every replica pads to the same prompt length the plan is given: 12
# tokens each, words the preset's vocabulary holds whole (a word it lacks is spelled letter by letter).
PROMPTS = [
    "Please answer this question about pipeline parallel memory in one sentence.",
    "What can each device hold when the model is tensor parallel?",
    "How should a large batch of data help the pipeline work?",
    "Where is the memory of one layer on each parallel device?",
]


@pytest.fixture(scope="module")
def wb(workbench):
    """The session's shared two engines."""
    return workbench


@pytest.mark.parametrize("strategy, microbatches", [("data", 1), ("pipeline", 2), ("tensor", 1)])
@pytest.mark.parametrize("new_tokens", [0, 16])
def test_prediction_matches_the_engines(wb, tiny_folder, strategy, microbatches, new_tokens):
    from mpbook.models import load_tokenizer

    lengths = {len(ids) for ids in load_tokenizer(tiny_folder)(PROMPTS)["input_ids"]}
    assert len(lengths) == 1
    result = wb.generate(
        PROMPTS, strategy=strategy, model=tiny_folder, microbatches=microbatches, max_new_tokens=new_tokens,
        track_tensors=True,
    )
    layout = result.layout
    plan = mpbook.plan(
        tiny_folder, dp=layout.dp, pp=layout.pp, tp=layout.tp, batch=len(PROMPTS), prompt_len=lengths.pop(),
        max_new_tokens=new_tokens, microbatches=microbatches, device_memory_bytes=1 << 40,
    )
    # What the README says: the weights exact, the peak within 12% of the tensor bytes each
    # rank tracked op by op (measured: 0.2-3% low after 16 new tokens, 4-11% low for a forward pass).
    for rank, predicted in enumerate(plan.ranks):
        assert predicted.parameters == result.weight_bytes[rank]
        measured_peak = result.tensor_peak_bytes[rank]
        assert abs(predicted.total - measured_peak) <= 0.12 * measured_peak, (rank, predicted.total, measured_peak)
