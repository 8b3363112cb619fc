"""Combined layouts on one (dp, pp, tp) mesh of 4 engines, against one device."""

from __future__ import annotations

import pytest

from mpbook.layout import Layout
from mpbook.reference import reference
from test_strategies import NEW_TOKENS, PROMPTS, assert_matches_one_device


@pytest.mark.parametrize(
    "strategy, degrees, microbatches, expected",
    [
        ("tensor", {"pp": 2}, 2, Layout(pp=2, tp=2)),  # the strategy's degree takes what pp leaves
        ("data", {"pp": 2}, 1, Layout(dp=2, pp=2)),
        ("data", {"tp": 2}, 1, Layout(dp=2, tp=2)),
        ("pipeline", {}, 2, Layout(pp=4)),
    ],
)
def test_combined_layouts_match_one_device(wb4, tiny_folder, strategy, degrees, microbatches, expected):
    logits, tokens = reference(tiny_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    forward = wb4.forward(PROMPTS, strategy=strategy, model=tiny_folder, microbatches=microbatches, **degrees)
    assert_matches_one_device(forward, logits, None)
    layout = forward.layout
    assert layout == expected
    counts = forward.total_collectives()
    # tensor parallel: 2 all-reduces per decoder layer per micro-batch on each of the tp ranks
    # that share the layer, in every replica (each stage holds only its own layers), and 1 for
    # the vocab-parallel embedding on the first stage
    assert counts.get("all_reduce", 0) == ((2 * 6 + 1) * microbatches * layout.tp * layout.dp if layout.tp > 1 else 0)
    # pipeline: p-1 activation sends per micro-batch, in every (dp, tp) pipeline
    assert counts.get("send", 0) == (layout.pp - 1) * microbatches * layout.dp * layout.tp
    generated = wb4.generate(
        PROMPTS, strategy=strategy, model=tiny_folder, microbatches=microbatches, max_new_tokens=NEW_TOKENS, **degrees
    )
    assert_matches_one_device(generated, None, tokens)
