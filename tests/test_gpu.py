"""CUDA engines (NCCL): one engine per visible GPU. Skipped, with that reason, without a GPU."""

from __future__ import annotations

import pytest

import mpbook
from mpbook import MpbookError, Workbench
from mpbook.reference import reference
from test_strategies import NEW_TOKENS, PROMPTS, assert_matches_one_device

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_wb():
    with Workbench.start(gpu=True) as wb:
        yield wb


def test_one_engine_per_gpu_with_nccl(gpu_wb):
    assert all(e.backend == "nccl" for e in gpu_wb.engines)
    assert [e.device for e in gpu_wb.engines] == [f"cuda:{i}" for i in range(gpu_wb.world_size)]
    gpu_wb.run("t = torch.ones(1, device=device); dist.all_reduce(t); assert t.item() == world_size")


@pytest.mark.parametrize("strategy", ["data", "pipeline", "tensor"])
def test_strategies_on_gpus_match_one_device(gpu_wb, tiny_folder, strategy):
    logits, tokens = reference(tiny_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    options = {"microbatches": 2} if strategy == "pipeline" else {}
    assert_matches_one_device(gpu_wb.forward(PROMPTS, strategy=strategy, model=tiny_folder, **options), logits, None)
    generated = gpu_wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS, **options)
    assert_matches_one_device(generated, None, tokens)


@pytest.mark.parametrize("strategy", ["data", "tensor"])
def test_compiled_decode_on_gpus_matches_one_device_and_is_reused(gpu_wb, tiny_folder, strategy):
    """``--compile`` on a GPU: the decode step as a CUDA graph where no collective runs inside
    it (data), torch.compile alone where one does (tensor); one device's tokens, compiled once
    per shape and reused by the next cell."""
    if strategy == "tensor" and gpu_wb.world_size < 2:
        pytest.skip("tensor parallel needs 2 GPUs; 1 is visible")
    _, tokens = reference(tiny_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    first = gpu_wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS, compile=True)
    again = gpu_wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS, compile=True)
    assert first.token_ids == tokens == again.token_ids
    assert all(seconds is not None and seconds > 0 for seconds in first.compile_seconds)
    assert again.compile_seconds == [None] * gpu_wb.world_size


def test_bfloat16_generation_runs(gpu_wb, tiny_folder):
    result = gpu_wb.generate(PROMPTS, strategy="data", model=tiny_folder, max_new_tokens=8, dtype="bfloat16")
    assert result.decode_tokens_per_s > 0 and all(len(t) == 8 for t in result.token_ids)


def test_planner_peak_within_20_percent_of_cuda_peak(gpu_wb, tiny_folder):
    from mpbook.models import load_tokenizer

    prompts = [p * 8 for p in PROMPTS]
    result = gpu_wb.generate(prompts, strategy="data", model=tiny_folder, max_new_tokens=16)
    prompt_len = max(len(ids) for ids in load_tokenizer(tiny_folder)(prompts)["input_ids"])
    layout = result.layout
    plan = mpbook.plan(tiny_folder, dp=layout.dp, pp=layout.pp, tp=layout.tp, batch=len(prompts),
                       prompt_len=prompt_len, max_new_tokens=16, device_memory_bytes=1 << 40)
    for rank, predicted in enumerate(plan.ranks[:1]):  # rank 0 holds the longest prompts
        assert abs(predicted.parameters - result.weight_bytes[rank]) <= 0.05 * result.weight_bytes[rank]
        assert abs(predicted.total - result.peak_memory_bytes[rank]) <= 0.2 * result.peak_memory_bytes[rank]


def test_device_out_of_memory_names_rank_and_bytes_and_the_engine_stays_up(gpu_wb, tiny_folder):
    # A real CUDA out-of-memory: cap what the allocator may take on every engine.
    gpu_wb.run("torch.cuda.empty_cache(); torch.cuda.set_per_process_memory_fraction(0.00001, device)")
    try:
        with pytest.raises(MpbookError, match=r"out of memory on rank \d \(cuda:\d\): asked for .*GiB free of"):
            gpu_wb.generate(PROMPTS * 4, strategy="data", model=tiny_folder, max_new_tokens=4)
    finally:
        gpu_wb.run("torch.cuda.set_per_process_memory_fraction(1.0, device)")
    again = gpu_wb.generate(PROMPTS, strategy="data", model=tiny_folder, max_new_tokens=4)
    assert len(again.token_ids) == len(PROMPTS)
