"""Data, pipeline and tensor parallel inference on real engines, against one device."""

from __future__ import annotations

import pytest
import torch

from mpbook import MpbookError
from mpbook.models.tokenizer import TOKENIZER_IDS
from mpbook.reference import reference

# Different lengths on purpose: left padding and positions must be right for every row.
PROMPTS = [
    "Explain pipeline parallelism in one sentence.",
    "Hi",
    "What does an all-reduce do?",
    "Tensor parallel splits every weight matrix",
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def expected(tiny_folder):
    return reference(tiny_folder, PROMPTS, max_new_tokens=NEW_TOKENS)


def assert_matches_one_device(result, expected_logits, expected_tokens):
    if expected_logits is not None:
        assert result.logits is not None and len(result.logits) == len(expected_logits)
        for got, want in zip(result.logits, expected_logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if expected_tokens is not None:
        # each prompt's tokens up to and including its finishing one, on both sides
        assert result.token_ids == expected_tokens


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("data", {}),
        ("pipeline", {}),
        ("pipeline", {"microbatches": 2}),
        ("pipeline", {"microbatches": 2, "stage_sizes": [5, 1]}),
        ("tensor", {}),
    ],
)
@pytest.mark.cluster
@pytest.mark.parametrize("transport", ["mpi", "gloo"])
def test_two_engines_match_one_device(request, tiny_folder, expected, strategy, options, transport):
    workbench = request.getfixturevalue("workbench" if transport == "mpi" else "gloo_workbench")
    assert {e.transport for e in workbench.engines} == {transport}
    logits, tokens = expected
    forward = workbench.forward(PROMPTS, strategy=strategy, model=tiny_folder, **options)
    assert_matches_one_device(forward, logits, None)
    generated = workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW_TOKENS, **options)
    assert_matches_one_device(generated, None, tokens)
    # every group of the run said which transport moved its tensors
    used = {t for per_rank in generated.transports for t in per_rank.values()}
    assert used == (set() if strategy == "data" else {transport})
    assert len(generated.texts) == len(PROMPTS)
    assert generated.prefill_tokens_per_s > 0 and generated.decode_tokens_per_s > 0


def test_collectives_per_forward_come_from_telemetry(workbench, tiny_folder):
    layers = 6  # the tiny preset
    data = workbench.forward(PROMPTS, strategy="data", model=tiny_folder)
    assert data.total_collectives() == {}  # replicas never talk
    tensor = workbench.forward(PROMPTS, strategy="tensor", model=tiny_folder)
    # 2 all-reduces per decoder layer (after attention, after the MLP) and 1 for the
    # vocab-parallel embedding; the vocab-parallel logits are gathered once, onto the reporting rank.
    assert tensor.collectives == [{"all_reduce": 2 * layers + 1, "gather": 1}] * 2
    for m in (1, 2, 4):
        pipe = workbench.forward(PROMPTS, strategy="pipeline", model=tiny_folder, microbatches=m)
        # p-1 = 1 activation send (and recv) per micro-batch
        assert pipe.total_collectives() == {"send": m, "recv": m}


def test_pipeline_stage_holds_only_its_layers(workbench, tiny_folder):
    full = workbench.forward(PROMPTS[:2], strategy="data", model=tiny_folder).weight_bytes
    split = workbench.forward(PROMPTS[:2], strategy="pipeline", model=tiny_folder, stage_sizes=[3, 3]).weight_bytes
    tensor = workbench.forward(PROMPTS[:2], strategy="tensor", model=tiny_folder).weight_bytes
    assert full[0] == full[1]
    assert split[0] < full[0] and split[1] < full[0]
    # tensor parallel splits the vocabulary (embedding and head) too: 394 = 197 + 197
    assert tensor[0] < full[0] and tensor[0] == tensor[1]


def test_timeline_has_every_microbatch_on_every_stage_without_overlap(workbench, tiny_folder):
    m = 4
    result = workbench.forward(PROMPTS, strategy="pipeline", model=tiny_folder, microbatches=m)
    prefill = [e for e in result.timeline if e.phase == "prefill"]
    assert sorted((e.stage, e.microbatch) for e in prefill) == [(s, j) for s in range(2) for j in range(m)]
    for stage in range(2):
        bars = sorted((e.start, e.end) for e in prefill if e.stage == stage)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(bars, bars[1:]))
    # a micro-batch reaches stage 1 only after stage 0 has finished it
    for j in range(m):
        s0 = next(e for e in prefill if e.stage == 0 and e.microbatch == j)
        s1 = next(e for e in prefill if e.stage == 1 and e.microbatch == j)
        assert s1.start >= s0.end


def test_same_model_and_layout_reuse_the_loaded_model(workbench, tiny_folder):
    workbench.forward(PROMPTS, strategy="tensor", model=tiny_folder)
    again = workbench.forward(PROMPTS, strategy="tensor", model=tiny_folder)
    assert again.load_seconds == [0.0, 0.0]


def test_qwen2_with_biases_and_untied_head(workbench, qwen2_folder):
    logits, tokens = reference(qwen2_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    for strategy in ("data", "pipeline", "tensor"):
        assert_matches_one_device(workbench.forward(PROMPTS, strategy=strategy, model=qwen2_folder), logits, None)
        result = workbench.generate(PROMPTS, strategy=strategy, model=qwen2_folder, max_new_tokens=NEW_TOKENS)
        assert_matches_one_device(result, None, tokens)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"strategy": "tensor", "tp": 3}, "dp=1 x pp=1 x tp=3 = 3, but 2 engines are up"),
        ({"strategy": "data", "pp": 3}, "does not divide the 2 engines"),
        ({"strategy": "pipeline", "stage_sizes": [2, 2]}, "add up to the 6 layers"),
        ({"strategy": "pipeline", "microbatches": 0}, "--microbatches 0: use at least 1"),
        ({"strategy": "pipeline", "microbatches": 5}, "choose microbatches in 1..4"),
        ({"strategy": "data", "dtype": "float8"}, "choose one of float32, bfloat16, float16"),
        ({"strategy": "data", "max_new_tokens": 600}, "beyond the model's context of 512"),
        ({"strategy": "data", "model": "/no/such/folder"}, "no such folder"),
        ({"strategy": "sideways"}, "unknown strategy 'sideways'"),
    ],
)
def test_bad_input_fails_before_the_engines_work(workbench, tiny_folder, options, message):
    options = {"model": tiny_folder, **options}
    before = [e.pid for e in workbench.engines]
    with pytest.raises(MpbookError, match=message):
        workbench.generate(PROMPTS, **options)
    # the cluster is unharmed
    assert [e.pid for e in workbench.status()] == before
    workbench.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")


def test_tp_that_does_not_divide_the_heads_names_the_valid_choices(tiny_folder):
    from mpbook.models import load_config
    from mpbook.models.support import validate_tp

    with pytest.raises(MpbookError, match=r"tp=3 does not divide the 8 attention heads .* choose tp in \{1, 2, 4\}"):
        validate_tp(load_config(tiny_folder), 3)
    # a model with 6 heads and 2 KV heads: only 1 and 2 divide both
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, intermediate_size=96)
    with pytest.raises(MpbookError, match=r"tp=3 does not divide the 2 KV heads .* choose tp in \{1, 2\}"):
        validate_tp(config, 3)


def test_more_stages_than_layers(tiny_folder):
    from mpbook.parallel.pipeline import split_layers

    with pytest.raises(MpbookError, match="pp=8: the model has 6 decoder layers"):
        split_layers(6, 8)


def test_tensor_parallel_shards_are_dtensors_shards(workbench, tiny_folder):
    from test_models import _shards_against_dtensor

    styles, count = workbench.apply(_shards_against_dtensor, tiny_folder, stream=False)[0]
    assert styles == ["colwise", "embedding_rowwise", "rowwise"]
    assert count == 1 + 6 * 7  # the embedding (the head is tied to it), 7 projections per layer


@pytest.fixture(scope="module")
def biased_folder(tmp_path_factory):
    """A Llama with biases on every projection, o_proj and down_proj included."""
    from mpbook.models import save_random, tiny_config

    config = tiny_config()
    config.attention_bias = True
    config.mlp_bias = True
    return str(save_random(config, tmp_path_factory.mktemp("llama-biases"), seed=3))


def test_row_split_biases_are_added_once(workbench, biased_folder):
    logits, tokens = reference(biased_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    assert_matches_one_device(workbench.forward(PROMPTS, strategy="tensor", model=biased_folder), logits, None)
    generated = workbench.generate(PROMPTS, strategy="tensor", model=biased_folder, max_new_tokens=NEW_TOKENS)
    assert_matches_one_device(generated, None, tokens)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2: not Llama-family, so mpbook runs it data parallel only."""
    from transformers import GPT2Config

    from mpbook.models import save_random

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **TOKENIZER_IDS)
    return str(save_random(config, tmp_path_factory.mktemp("tiny-gpt2"), seed=4))


def test_other_architectures_run_data_parallel(workbench, gpt2_folder):
    logits, tokens = reference(gpt2_folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    assert_matches_one_device(workbench.forward(PROMPTS, strategy="data", model=gpt2_folder), logits, None)
    assert_matches_one_device(
        workbench.generate(PROMPTS, strategy="data", model=gpt2_folder, max_new_tokens=NEW_TOKENS), None, tokens
    )
    # GPT-2 has no pp plan (its stages come from its module order: tests/test_models.py) and no
    # tp plan: tensor parallel needs a plan from the user.
    with pytest.raises(MpbookError, match="gpt2 has no tensor-parallel plan .* gpt2 works with data, pipeline parallelism"):
        workbench.generate(PROMPTS, strategy="tensor", model=gpt2_folder)


def test_result_plots_come_from_the_run(workbench, tiny_folder):
    m = 3
    result = workbench.generate(PROMPTS[:3], strategy="pipeline", model=tiny_folder, microbatches=m, max_new_tokens=3)
    prefill = result.plot_timeline("prefill")
    assert len(prefill.axes[0].patches) == m * 2  # m micro-batches on each of 2 stages
    decode = result.plot_timeline("decode")
    assert len(decode.axes[0].patches) == m * 2 * 2  # two decode steps
    assert len(result.plot_timeline().axes[0].patches) == m * 2 * 3  # both: the whole run
    memory = result.plot_memory()
    labels = memory.axes[0].get_legend_handles_labels()[1]
    assert {"weights", "kv cache", "peak"} <= set(labels)
    collectives = result.plot_collectives()
    assert collectives.axes


@pytest.fixture(scope="module")
def huge_config_folder(tmp_path_factory):
    """A 70B-class Llama config (no weights: the planner stops it before anything loads)."""
    from transformers import LlamaConfig

    from mpbook.models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("huge-config")
    LlamaConfig(
        vocab_size=TOKENIZER_IDS["vocab_size"], hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=4096,
    ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_predicted_out_of_memory_names_rank_bytes_and_layouts(workbench, huge_config_folder):
    loaded = [e.model_bytes for e in workbench.status()]
    with pytest.raises(MpbookError) as info:
        workbench.generate(PROMPTS, strategy="tensor", model=huge_config_folder, max_new_tokens=4)
    message = str(info.value)
    assert message.startswith("out of memory (predicted): rank ")
    assert "GiB (weights " in message and "GiB shared by the engines on this host" in message
    assert "no layout of 2 engines fits" in message
    assert "\n" not in message
    # nothing was loaded (what the engines held is still there), the cluster is fine
    assert [e.model_bytes for e in workbench.status()] == loaded
    workbench.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")


def test_layout_advice_lists_only_layouts_that_fit_the_engines_memory(workbench, huge_config_folder):
    # tp=3 does not divide the 64 heads, nor make 2 engines; the layouts the model allows on 2
    # engines are named, but as not fitting (80 layers of width 8192 in float32), not as advice
    with pytest.raises(MpbookError) as info:
        workbench.generate(PROMPTS, strategy="tensor", tp=3, model=huge_config_folder, max_new_tokens=4)
    assert str(info.value) == (
        "tp=3 does not divide the 64 attention heads (8 KV heads) of this llama model; choose tp in {1, 2, 4, 8}; "
        "dp=1 x pp=1 x tp=3 = 3, but 2 engines are up; the layouts of 2 engines valid for this model and 4 prompts "
        "(dp=1 x pp=1 x tp=2; dp=1 x pp=2 x tp=1; dp=2 x pp=1 x tp=1) would not fit in the engines' memory: use "
        "more devices, a smaller dtype, fewer prompts or fewer new tokens"
    )


def test_layout_advice_followed_runs_on_the_engines(workbench, tiny_folder):
    import re

    from mpbook.layout import Layout

    # one prompt for the 2 replicas of `data` on 2 engines
    with pytest.raises(MpbookError) as info:
        workbench.generate(["Hi"], strategy="data", model=tiny_folder, max_new_tokens=2)
    message = str(info.value)
    assert message.startswith("1 prompt for dp=2 replicas: every replica needs at least one; layouts of 2 engines "
                              "valid for this model and 1 prompt: ")
    listing, _, asked = message.partition("; or, for ")
    suggested = [Layout(*map(int, m)) for m in re.findall(r"dp=(\d+) x pp=(\d+) x tp=(\d+)", listing)]
    assert sorted(map(str, suggested)) == ["dp=1 x pp=1 x tp=2", "dp=1 x pp=2 x tp=1"]
    for layout in suggested:
        result = workbench.generate(["Hi"], strategy="data", model=tiny_folder, max_new_tokens=2,
                                    dp=layout.dp, pp=layout.pp, tp=layout.tp)
        assert result.layout == layout and len(result.texts) == 1
    assert asked == "dp=2 x pp=1 x tp=1, give at least 2 prompts"
    assert len(workbench.generate(["Hi", "Ho"], strategy="data", model=tiny_folder, max_new_tokens=2).texts) == 2


def test_a_tensor_parallel_rank_holds_only_its_shards(tiny_folder):
    from mpbook.layout import Layout
    from mpbook.models import load_stage
    from mpbook.parallel.collectives import Group

    def load(layout, rank):
        return load_stage(tiny_folder, layout=layout, coords=layout.coords(rank), dtype=torch.float32, device="cpu",
                          group=lambda dims: Group(None, rank=rank, size=layout.tp)).model  # loaded, never run

    whole, shard = load(Layout(), 0), load(Layout(tp=2), 1)
    layer_bytes = sum(p.numel() * 4 for p in whole.model.layers.parameters())
    held = sum(p.untyped_storage().nbytes() for p in shard.model.layers.parameters())
    norms = sum(p.numel() * 4 for n, p in whole.model.layers.named_parameters() if "norm" in n)
    assert held == (layer_bytes - norms) // 2 + norms  # storage, not just views of whole tensors


@pytest.mark.parametrize("prompts, message", [([], "no prompts"), (["fine", ""], "prompt 1 is empty"),
                                              (["fine", None], "prompt 1 is empty")])
def test_missing_or_empty_prompts_fail_before_tokenizing(workbench, tiny_folder, prompts, message):
    with pytest.raises(MpbookError, match=message):
        workbench.generate(prompts, strategy="data", model=tiny_folder)
