"""``--compile``: a static KV cache and a torch.compile'd decode step, on real engines, against
one device and against the eager step; compiled once per shape, reused by the next cell."""

from __future__ import annotations

import pytest

from mpbook.engine.compiled import LENGTH_STEP, cache_length
from mpbook.reference import reference

# Different lengths on purpose: the static cache's mask must keep left padding out.
PROMPTS = [
    "Explain pipeline parallelism in one sentence.",
    "Hi",
    "What does an all-reduce do?",
    "Tensor parallel splits every weight matrix",
]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def expected_tokens(tiny_folder):
    return reference(tiny_folder, PROMPTS, max_new_tokens=NEW_TOKENS)[1]


def test_cache_length_holds_the_prompt_and_every_new_token_rounded_up():
    assert cache_length(10, 8) == LENGTH_STEP
    assert cache_length(LENGTH_STEP - 8, 8) == LENGTH_STEP
    assert cache_length(LENGTH_STEP - 7, 8) == 2 * LENGTH_STEP


@pytest.mark.parametrize("strategy, options", [
    ("data", {}),
    ("pipeline", {"microbatches": 2}),
    ("tensor", {}),
])
def test_compiled_decode_matches_one_device_and_is_reused(workbench, tiny_folder, expected_tokens, strategy, options):
    eager = workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS, **options)
    before = workbench.apply(_graphs_compiled, stream=False)
    first = workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS,
                               compile=True, **options)
    after = workbench.apply(_graphs_compiled, stream=False)
    # One graph per rank for its shape, compiled in the warm-up: the run's own steps met the
    # graph's guards (a tensor made otherwise than the warm-up's compiles again, mid-decode).
    assert [b - a for a, b in zip(before, after)] == [1] * workbench.world_size
    assert first.token_ids == expected_tokens == eager.token_ids
    # every rank compiled before its prefill, in a phase of its own that the cell's parts show
    assert all(seconds is not None and seconds > 0 for seconds in first.compile_seconds)
    assert all(phases.get("compiling", 0) > 0 for phases in first.rank_phase_seconds)
    assert dict(first.cell_parts())["compiling"] > 0
    assert "compiled (static KV cache) in" in first.summary()
    assert eager.compile_seconds == [None] * workbench.world_size and "compiled" not in eager.summary()

    again = workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS,
                               compile=True, **options)
    assert again.token_ids == expected_tokens
    assert again.compile_seconds == [None] * workbench.world_size  # the same shape: nothing compiled
    assert workbench.apply(_graphs_compiled, stream=False) == after
    assert "reused from an earlier cell" in again.summary()
    if strategy == "tensor":  # the collectives inside the compiled step ran and were counted as in eager
        assert again.collectives == eager.collectives


def test_a_new_shape_compiles_again_and_stays_exact(workbench, tiny_folder, expected_tokens):
    workbench.generate(PROMPTS, strategy="data", model=tiny_folder, max_new_tokens=NEW_TOKENS, compile=True)
    fewer = workbench.generate(PROMPTS[:2], strategy="data", model=tiny_folder, max_new_tokens=NEW_TOKENS,
                               compile=True)
    assert fewer.token_ids == expected_tokens[:2]
    assert any(seconds is not None for seconds in fewer.compile_seconds)  # one row per replica: a new shape


def test_a_tensor_parallel_layout_loaded_again_reuses_its_graphs(workbench, tiny_folder, expected_tokens):
    """An engine holds one model at a time: tensor parallel, then data, then tensor again
    loads the model three times. The graphs the first load compiled (their collectives call
    the group by a number) serve the third."""
    def run(strategy):
        return workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS,
                                  compile=True)

    run("tensor")
    run("data")
    before = workbench.apply(_graphs_compiled, stream=False)
    again = run("tensor")
    assert workbench.apply(_graphs_compiled, stream=False) == before
    assert again.token_ids == expected_tokens
    assert {t for r in again.transports for t in r.values()} == {e.transport for e in workbench.engines}


def test_a_forward_pass_ignores_compile(workbench, tiny_folder):
    plain = workbench.forward(PROMPTS, strategy="data", model=tiny_folder)
    compiled = workbench.forward(PROMPTS, strategy="data", model=tiny_folder, compile=True)
    assert not compiled.compiled and compiled.compile_seconds == [None] * workbench.world_size
    for got, want in zip(compiled.logits, plain.logits):
        assert got.equal(want)


def _graphs_compiled(state) -> int:
    """How many graphs torch.compile has made in this engine so far."""
    from mpbook.compat.torch import graphs_compiled

    return graphs_compiled()


@pytest.mark.cluster
def test_compiled_expert_parallel_matches_eager_and_one_device(workbench):
    """A mixture-of-experts step compiled with its experts split over the engines (ep=2): the
    expert all-reduce runs inside the compiled step, tokens as eager and as transformers' own."""
    from test_models import NEW_TOKENS as FAMILY_NEW_TOKENS
    from test_models import PROMPTS as FAMILY_PROMPTS
    from test_models import assert_matches, family_folder

    folder = family_folder("mixtral")
    run = dict(strategy="expert", model=folder, max_new_tokens=FAMILY_NEW_TOKENS)
    eager = workbench.generate(FAMILY_PROMPTS, **run)
    first = workbench.generate(FAMILY_PROMPTS, compile=True, **run)
    assert all(seconds is not None and seconds > 0 for seconds in first.compile_seconds)
    before = workbench.apply(_graphs_compiled, stream=False)
    again = workbench.generate(FAMILY_PROMPTS, compile=True, **run)
    assert again.compile_seconds == [None] * workbench.world_size
    # Reused whole: no decode step compiled again (the routes counter is one tensor to its guards).
    assert workbench.apply(_graphs_compiled, stream=False) == before
    assert first.token_ids == again.token_ids == eager.token_ids
    # The routes are the run's alone: the compile warm-up's scratch steps are not counted.
    assert first.expert_tokens == again.expert_tokens == eager.expert_tokens
    assert_matches(again, folder, logits=False)
    assert again.layout.ep == workbench.world_size
    assert again.collectives == eager.collectives and any(c.get("all_reduce") for c in again.collectives)
