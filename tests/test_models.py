"""Every family transformers can split, from its own plans: tiny random checkpoints of Gemma 2,
Phi-3, Mixtral, Qwen3-MoE, GPT-NeoX (and GPT-2, which has no plans), every strategy each one
supports on 2 real engines, against one device (logits atol 1e-4, greedy tokens identical to
transformers' generate); what the client checks before any engine works; what each rank holds.

Combinations with expert parallel on 4 engines: tests/test_models_ep.py.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from mpbook import MpbookError
from mpbook.layout import Layout

# Different lengths on purpose: left padding and positions must be right for every row; the
# long ones overflow Gemma 2's 4-token sliding window.
PROMPTS = [
    "Explain pipeline parallelism in one sentence.",
    "Hi",
    "What does an all-reduce do?",
]
NEW_TOKENS = 4
LAYERS = 4  # every family config in mpbook.models.presets.FAMILIES
# Granite: embedding, residual, attention and logit multipliers; OLMo 2: q/k norms over all heads.
FAMILIES = ("gemma2", "phi3", "mixtral", "qwen3_moe", "gpt_neox", "olmo2", "granite")
MOE_LAYERS = {"mixtral": 4, "qwen3_moe": 3}  # qwen3_moe's layer 1 is dense (mlp_only_layers)
# GPT-2 has neither a pp nor a tp plan; a user plan in the config's format splits it anyway.
# Its fused c_attn holds q|k|v one after the other, so a plain column split would cut across
# them: gathered instead (every rank computes every head), as Phi-3's own plan does.
GPT2_TP_PLAN = {"tp": {
    "h.*.attn.c_attn": "colwise_gather_output", "h.*.attn.c_proj": "rowwise_split_input",
    "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise",
}}
# OPT has no pp plan, and its layers sit one level down (model.decoder.layers): a user pp plan
# names its modules in forward order.
OPT_PP_PLAN = {"pp": {
    "decoder.embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "decoder.embed_positions": (["attention_mask"], ["positions"]),
    "decoder.layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "decoder.final_layer_norm": (["hidden_states"], ["hidden_states"]),
}}


@functools.cache
def family_folder(model_type: str, **overrides) -> str:
    """A tiny random checkpoint of ``model_type`` saved with save_pretrained (once per process)."""
    from mpbook.models.presets import FAMILIES as KNOWN, family_config, save_random

    config = family_config(model_type, **overrides) if model_type in KNOWN else _config(model_type, **overrides)
    folder = tempfile.mkdtemp(prefix=f"family-{model_type}-")  # in the session's temporary folder
    return str(save_random(config, folder, seed=sorted(KNOWN).index(model_type) if model_type in KNOWN else 99))


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    from mpbook.models.tokenizer import TOKENIZER_IDS

    base = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
                word_embed_proj_dim=64, **TOKENIZER_IDS)
    return AutoConfig.for_model(model_type, **{**base, **overrides})


@functools.cache
def expected(folder: str, attention: str | None = None):
    """One device, plain transformers: (logits per prompt, generate's greedy tokens)."""
    from mpbook.reference import reference

    return reference(folder, PROMPTS, max_new_tokens=NEW_TOKENS, attention=attention)


def assert_matches(result, folder, *, attention=None, logits=True):
    want_logits, want_tokens = expected(folder, attention)
    if logits:
        assert result.logits is not None and len(result.logits) == len(want_logits)
        for got, want in zip(result.logits, want_logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        # each prompt's tokens up to and including its finishing one, on both sides
        assert result.token_ids == want_tokens


# ----------------------------------------------------------------------------- structure (no engines)
def config_of(model_type: str):
    from mpbook.models import load_config

    return load_config(family_folder(model_type))


@pytest.mark.parametrize("model_type, prefix, pre, post, attention", [
    ("gemma2", "model", ("embed_tokens",), ("norm",), "eager"),  # no sdpa: it cannot softcap
    ("phi3", "model", ("embed_tokens",), ("norm",), "sdpa"),
    ("mixtral", "model", ("embed_tokens",), ("norm",), "sdpa"),
    ("qwen3_moe", "model", ("embed_tokens",), ("norm",), "sdpa"),
    ("gpt_neox", "gpt_neox", ("embed_in", "emb_dropout"), ("final_layer_norm",), "sdpa"),
    ("gpt2", "transformer", ("wte", "wpe"), ("ln_f",), "sdpa"),  # no pp plan: module order
])
def test_structure_comes_from_the_model(model_type, prefix, pre, post, attention):
    from mpbook.models.structure import structure

    config = config_of(model_type)
    s = structure(config)
    assert (s.base_prefix, s.pre, s.post, s.head) == (prefix, pre, post, ("lm_head",))
    assert s.attn_implementation == attention
    assert s.pp_source == ("module order" if model_type == "gpt2" else "plan")
    # The config's own rules, prefixed, are the plan: nothing of a family is written into mpbook.
    own = config.base_model_tp_plan or {}
    assert {f"{prefix}.{k}": v for k, v in own.items()}.items() <= s.tp_plan.items()
    # Under tp every family gets a vocab-parallel embedding and head.
    rules = s.tp_rules()
    assert rules[s.embedding] == "embedding_rowwise" and rules["lm_head"] == "colwise"
    assert s.num_experts == (4 if model_type in MOE_LAYERS else None)


def test_supported_strategies_read_the_plans():
    from mpbook.models import supported_strategies

    got = {mt: supported_strategies(config_of(mt)) for mt in (*FAMILIES, "gpt2")}
    assert got == {
        "gemma2": ("data", "pipeline", "tensor"),
        "phi3": ("data", "pipeline", "tensor"),
        "mixtral": ("data", "pipeline", "tensor", "expert"),
        "qwen3_moe": ("data", "pipeline", "tensor", "expert"),
        "gpt_neox": ("data", "pipeline", "tensor"),
        "olmo2": ("data", "pipeline", "tensor"),
        "granite": ("data", "pipeline", "tensor"),
        "gpt2": ("data", "pipeline"),
    }
    assert supported_strategies(config_of("gpt2"), GPT2_TP_PLAN) == ("data", "pipeline", "tensor")
    opt = _config("opt")
    assert supported_strategies(opt) == ("data",)
    assert supported_strategies(opt, OPT_PP_PLAN) == ("data", "pipeline")


@pytest.mark.parametrize("model_type, layout, message", [
    ("mixtral", Layout(ep=3), r"^ep=3 does not divide the 4 experts of this mixtral model; choose ep in \{1, 2, 4\}$"),
    ("qwen3_moe", Layout(ep=8), r"^ep=8 does not divide the 4 experts of this qwen3_moe model; choose ep in \{1, 2, 4\}$"),
    ("gemma2", Layout(tp=3), r"^tp=3 does not divide the 4 attention heads \(2 KV heads\) of this gemma2 model; "
                             r"choose tp in \{1, 2\}$"),
    ("mixtral", Layout(tp=4), r"^tp=4 does not divide the 2 KV heads \(4 attention heads\) of this mixtral model; "
                              r"choose tp in \{1, 2\}$"),
    ("gpt2", Layout(tp=2), r"^tp=2: gpt2 has no tensor-parallel plan for its decoder layers \(its config carries no "
                           r"base_model_tp_plan\); gpt2 works with data, pipeline parallelism; to split it anyway, "
                           r"pass plans=\{'tp': "),
    ("gemma2", Layout(ep=2), r"^ep=2: gemma2 has no expert-parallel plan .*; gemma2 works with data, pipeline, tensor "
                             r"parallelism"),
    ("opt", Layout(pp=2), r"^pp=2: opt has no base_model_pp_plan and its decoder layers sit inside decoder \(not a "
                          r"child of its base model\), so mpbook cannot order its stages; opt works with data "
                          r"parallelism; to split it anyway, pass plans=\{'pp': "),
    ("phi3", Layout(pp=5), r"^pp=5: the model has 4 decoder layers, so at most 4 stages; choose pp in 1..4$"),
])
def test_bad_layouts_name_the_models_numbers_and_the_choices(model_type, layout, message):
    from mpbook.models import check_layout

    config = _config("opt") if model_type == "opt" else config_of(model_type)
    with pytest.raises(MpbookError, match=message) as info:
        check_layout(config, layout)
    assert "\n" not in str(info.value)


def test_gathered_heads_need_no_divisibility():
    """Phi-3's plan gathers its fused qkv (every rank computes every head): any tp works."""
    from mpbook.models import check_layout

    check_layout(config_of("phi3"), Layout(tp=3))
    check_layout(config_of("mixtral"), Layout(tp=2, ep=2, pp=2))


def test_old_names_still_check():
    from mpbook.models import supported_strategies
    from mpbook.models.support import validate_tp

    with pytest.raises(MpbookError, match=r"tp=3 does not divide the 4 attention heads .* choose tp in \{1, 2, 4\}"):
        validate_tp(config_of("gpt_neox"), 3)
    assert "pipeline" in supported_strategies(config_of("gpt_neox"))


def test_the_readme_table_comes_from_the_plans():
    from mpbook.models import architecture_table

    table = architecture_table(["mixtral", "gpt2", "opt", "gemma2"])
    assert table.splitlines()[2:] == [
        "| `gemma2` | yes | yes | yes | - |",
        "| `gpt2` | yes | yes (module order) | - | - |",
        "| `mixtral` | yes | yes | yes | yes |",
        "| `opt` | yes | - | - | - |",
    ]


def test_what_each_rank_holds():
    """models.structure says what every rank of a layout holds (the planner's source): experts
    split by ep, the vocabulary by tp, layers by pp; checked against the engines below."""
    from mpbook.models.parts import held_bytes, held_tensors

    config = config_of("mixtral")
    whole = held_bytes(held_tensors(config, Layout(), 0))
    vocab, hidden = config.vocab_size, config.hidden_size
    assert whole["embedding"] == whole["head"] == vocab * hidden * 4  # untied
    ep = [held_bytes(held_tensors(config, Layout(ep=2), r)) for r in range(2)]
    assert [b["experts"] for b in ep] == [whole["experts"] // 2] * 2
    assert [b["layers"] for b in ep] == [whole["layers"]] * 2  # attention and router replicated
    tp = [held_bytes(held_tensors(config, Layout(tp=2), r)) for r in range(2)]
    assert [b["embedding"] for b in tp] == [-(-vocab // 2) * hidden * 4, (vocab - -(-vocab // 2)) * hidden * 4]
    # The experts under tp follow the family's own plan: split where it shards them
    # (transformers up to 5.24), whole on every rank where it leaves them out (5.25 on).
    experts_sharded = any(".experts" in key for key in config.base_model_tp_plan)
    assert [b["experts"] for b in tp] == ([whole["experts"] // 2] * 2 if experts_sharded else [whole["experts"]] * 2)
    pp = [held_bytes(held_tensors(config, Layout(pp=2), r)) for r in range(2)]
    assert (pp[0].get("head", 0), pp[1].get("embedding", 0)) == (0, 0)
    assert pp[0]["experts"] + pp[1]["experts"] == whole["experts"]
    tied = config_of("llama")  # tied: one matrix where embedding and head sit together
    assert held_bytes(held_tensors(tied, Layout(tp=2), 0)).get("head", 0) == 0
    assert held_bytes(held_tensors(tied, Layout(pp=2), 1))["head"] == tied.vocab_size * tied.hidden_size * 4


def test_telemetry_counts_expert_tokens():
    """Counts arrive as 0-d tensors from the MoE layers (no host sync there); the snapshot and
    the run's stats read them."""
    from mpbook.engine.telemetry import Telemetry

    tel = Telemetry(0, torch.device("cpu"))
    tel.add_expert_tokens(3)
    with tel.run() as stats:
        tel.add_expert_tokens(torch.tensor(5))
        tel.add_expert_tokens(torch.tensor(2))
        assert tel.snapshot()["expert_tokens"] == 10
    tel.add_expert_tokens(1)  # after the run
    assert stats.expert_tokens == 7  # this run's own


def test_a_user_plan_error_says_what_is_wrong():
    from mpbook.models import supported_strategies

    with pytest.raises(MpbookError, match="keys among 'tp', 'pp', 'ep'"):
        supported_strategies(config_of("gpt2"), {"tensor": {}})


# ----------------------------------------------------------------------------- real engines
# (family, strategy, degrees beyond the strategy's own): every strategy each family supports.
CASES = [(mt, s, {}) for mt in FAMILIES for s in ("data", "pipeline", "tensor")]
CASES += [(mt, "tensor", {"ep": 2}) for mt in MOE_LAYERS]  # tp=1 x ep=2: expert parallel on 2 engines


@pytest.fixture(scope="module")
def wb(workbench):
    """The session's shared two engines."""
    return workbench


def held_weight_bytes(folder, layout, *, plans=None) -> list[int]:
    """What models.structure says each rank holds (the planner's source), in parameter bytes."""
    from mpbook.models import load_config
    from mpbook.models.parts import held_tensors

    config = load_config(folder)
    return [sum(h.nbytes for h in held_tensors(config, layout, r, plans=plans) if h.kind != "buffer")
            for r in range(layout.world_size)]


def planned(folder, layout: Layout, *, prompt_len: int, plans=None):
    """mpbook.plan for the rows of PROMPTS, left-padded to the longest (as one micro-batch is)."""
    from mpbook import plan
    from mpbook.models import load_config

    return plan(load_config(folder), dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep, batch=len(PROMPTS),
                prompt_len=prompt_len, max_new_tokens=0, plans=plans, device_memory_bytes=1 << 40)


def experts_in_tp_plan(model_type: str) -> bool:
    return any(".experts" in key for key in (config_of(model_type).base_model_tp_plan or {}))


def expected_collectives(model_type: str, layout: Layout) -> list[dict[str, int]]:
    """Each rank's collectives in one forward pass (2 engines; logits gathered for the result)."""
    if layout.tp > 1:
        # 2 all-reduces per layer (after attention, after the MLP or the MoE), 1 for the
        # vocab-parallel embedding; Phi-3's plan gathers its fused qkv and gate_up in every
        # layer too, OLMo 2's its q, k and v (its q/k norms span all heads); the vocab-parallel
        # logits are gathered once, onto the reporting rank.
        # A MoE layer's experts are split only where the family's plan names them (Mixtral's
        # and Qwen3-MoE's up to transformers 5.24); otherwise every rank runs every expert,
        # and the layer has the attention's all-reduce alone.
        replicated_moe = 0 if experts_in_tp_plan(model_type) else MOE_LAYERS.get(model_type, 0)
        counts = {"all_reduce": 2 * LAYERS + 1 - replicated_moe, "gather": 1}
        if model_type == "phi3":
            counts["all_gather"] = 2 * LAYERS
        if model_type == "olmo2":
            counts["all_gather"] = 3 * LAYERS
        return [counts] * 2
    if layout.ep > 1:
        return [{"all_reduce": MOE_LAYERS[model_type]}] * 2  # one per MoE layer, nothing else
    if layout.pp > 1:
        return [{"send": 1}, {"recv": 1}]  # the activation, from stage 0 to stage 1
    return [{}, {}]


@pytest.mark.cluster
@pytest.mark.parametrize("model_type, strategy, degrees", CASES,
                         ids=[f"{mt}-{s}{'-ep2' if d else ''}" for mt, s, d in CASES])
def test_every_strategy_matches_one_device(wb, model_type, strategy, degrees):
    forward = forward_checked(wb, model_type, strategy, degrees)
    assert forward.collectives == expected_collectives(model_type, forward.layout)
    generate_checked(wb, model_type, strategy, degrees)


def forward_checked(wb, model_type: str, strategy: str, degrees: dict):
    """A forward pass of the family's tiny checkpoint against one device: every logit, what
    each rank holds, and the planner's figures for the same layout."""
    folder = family_folder(model_type)
    # One micro-batch (the default is one per stage): the planner's KV cache below pads every
    # row to the longest prompt, as one micro-batch does.
    forward = wb.forward(PROMPTS, strategy=strategy, model=folder, microbatches=1, **degrees)
    assert_matches(forward, folder)
    layout = forward.layout
    assert forward.weight_bytes == held_weight_bytes(folder, layout)
    # The planner reads the same structure: weights per rank, exact (experts split by ep,
    # the vocabulary by tp); the KV cache too where every row is padded to the longest prompt
    # (one replica) and no layer slides a window (the planner counts a sliding layer's
    # storage, the engines the elements of its view).
    predicted = planned(folder, layout, prompt_len=max(forward.prompt_tokens))
    assert [r.parameters for r in predicted.ranks] == forward.weight_bytes
    if layout.dp == 1 and model_type != "gemma2":
        assert [r.kv_cache for r in predicted.ranks] == forward.kv_cache_bytes
    return forward


def generate_checked(wb, model_type: str, strategy: str, degrees: dict):
    """Greedy generation on the layout the forward pass loaded: tokens as transformers' own."""
    folder = family_folder(model_type)
    generated = wb.generate(PROMPTS, strategy=strategy, model=folder, max_new_tokens=NEW_TOKENS, **degrees)
    assert_matches(generated, folder, logits=False)
    assert generated.load_seconds == [0.0] * wb.world_size  # the model loaded for the forward pass was kept


@pytest.mark.cluster
def test_expert_parallel_counts_each_ranks_expert_load(wb):
    """Telemetry's expert_tokens: every (token, expert) route lands on exactly one rank."""
    folder = family_folder("mixtral")

    def routes(state):
        return state.telemetry.snapshot()["expert_tokens"]

    wb.forward(PROMPTS, strategy="tensor", ep=2, model=folder)  # loaded (and counted) before
    before = wb.apply(routes, stream=False)
    result = wb.forward(PROMPTS, strategy="tensor", ep=2, model=folder)
    after = wb.apply(routes, stream=False)
    per_rank = [a - b for a, b in zip(after, before)]
    positions = len(PROMPTS) * max(result.prompt_tokens)  # pad positions are routed too
    assert sum(per_rank) == 2 * positions * MOE_LAYERS["mixtral"]  # top-2
    assert all(n > 0 for n in per_rank)


@pytest.mark.cluster
def test_the_result_and_the_dashboard_show_each_ranks_expert_load(wb):
    """What the engines count (routes to each rank's experts) reaches the result, its summary
    and the dashboard's rows."""
    from mpbook.dashboard import Dashboard

    folder = family_folder("mixtral")

    def routes(state):
        return state.telemetry.snapshot()["expert_tokens"]

    wb.generate(PROMPTS, strategy="expert", model=folder, max_new_tokens=NEW_TOKENS)  # loaded before
    before = wb.apply(routes, stream=False)
    dash = Dashboard(wb, mode="widget")
    result = wb.generate(PROMPTS, strategy="expert", model=folder, max_new_tokens=NEW_TOKENS, dashboard=dash)
    after = wb.apply(routes, stream=False)
    per_rank = [a - b for a, b in zip(after, before)]
    assert result.expert_tokens == per_rank and all(n > 0 for n in per_rank)
    assert f"  expert load per rank (routes to its experts): [{', '.join(map(str, per_rank))}]" in (
        result.summary().splitlines())
    assert [dash.view.values()[r]["expert load"] for r in wb.ranks] == [f"{n:,}" for n in per_rank]
    # a model without experts shows none
    dense = wb.generate(PROMPTS, strategy="tensor", model=family_folder("granite"), max_new_tokens=2)
    assert dense.expert_tokens == [0, 0] and "expert load" not in dense.summary()


@pytest.mark.cluster
def test_ep_not_dividing_the_experts_fails_on_the_engines_with_the_numbers(wb):
    """The engines check the layout too (the session's early check is the client's)."""
    folder = family_folder("mixtral", num_local_experts=3)
    with pytest.raises(MpbookError, match=r"ep=2 does not divide the 3 experts of this mixtral model; "
                                          r"choose ep in \{1, 3\}"):
        wb.forward(PROMPTS, strategy="tensor", ep=2, model=folder)
    wb.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")


def _run(wb, folder, layout: Layout, max_new_tokens: int, **fields):
    """A run the session has no argument for yet (a user plan, an attention implementation),
    sent to the engines as the session would send it."""
    from mpbook.engine import decode
    from mpbook.models import load_tokenizer
    from mpbook.protocol import Request, Stopping
    from mpbook.results import merge
    from mpbook.session.prompts import encode_prompts

    tokenizer = load_tokenizer(folder)
    ids = encode_prompts(tokenizer, PROMPTS).input_ids  # as the session and the reference encode them
    request = Request(model=folder, layout=layout, input_ids=ids, max_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id,
                      stopping=Stopping(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,)),
                      **fields)
    outputs = wb.apply(decode.run, request, stream=False)
    return merge(outputs, strategy="tensor", request=request, prompts=PROMPTS, tokenizer=tokenizer,
                 prompt_tokens=[len(x) for x in ids], device_type="cpu")


@pytest.mark.cluster
@pytest.mark.parametrize("model_type, layout, plans", [
    ("gpt2", Layout(tp=2), GPT2_TP_PLAN),
    ("gpt2", Layout(pp=2), None),
    ("opt", Layout(pp=2), OPT_PP_PLAN),
], ids=["gpt2-tensor-user-plan", "gpt2-pipeline-module-order", "opt-pipeline-user-plan"])
def test_a_family_without_plans_splits_with_a_users_plan(wb, model_type, layout, plans):
    folder = family_folder(model_type)
    assert_matches(_run(wb, folder, layout, 0, plans=plans), folder)
    assert_matches(_run(wb, folder, layout, NEW_TOKENS, plans=plans), folder, logits=False)
    assert _run(wb, folder, layout, 0, plans=plans).weight_bytes == held_weight_bytes(folder, layout, plans=plans)


@pytest.mark.cluster
def test_a_state_space_model_runs_data_parallel(wb):
    """Mamba keeps a recurrent state, not a KV cache: data parallel runs it through its own
    generation inputs (no attention mask after the prompt); the split strategies refuse it."""
    from mpbook.models import supported_strategies

    folder = family_folder("mamba", num_hidden_layers=2)
    assert supported_strategies(_config("mamba")) == ("data",)
    assert_matches(wb.forward(PROMPTS, strategy="data", model=folder), folder)
    assert_matches(wb.generate(PROMPTS, strategy="data", model=folder, max_new_tokens=NEW_TOKENS), folder, logits=False)
    with pytest.raises(MpbookError, match=r"pp=2: mamba.s layers keep a recurrent state .* mamba works with data parallelism; layouts of 2 engines valid for this model and \d+ prompts: dp=2 x pp=1 x tp=1$"):
        wb.generate(PROMPTS, strategy="pipeline", model=folder)


@pytest.mark.cluster
def test_a_user_rule_replaces_the_familys(wb):
    """Whole embedding and head on every rank (no vocab-parallel collectives), by user rules."""
    folder = family_folder("gemma2")
    plans = {"tp": {"embed_tokens": "replicate", "lm_head": "replicate"}}
    result = _run(wb, folder, Layout(tp=2), 0, plans=plans)
    assert_matches(result, folder)
    assert result.collectives == [{"all_reduce": 2 * LAYERS}] * 2
    assert result.weight_bytes == held_weight_bytes(folder, Layout(tp=2), plans=plans)


@pytest.mark.cluster
def test_the_attention_implementation_can_be_chosen(wb):
    """Mixtral defaults to sdpa; asked for eager, every stage runs eager (against eager)."""
    folder = family_folder("mixtral")
    assert_matches(_run(wb, folder, Layout(pp=2), 0, attention="eager"), folder, attention="eager")

    def implementations(state):
        from mpbook.compat import transformers as hf_compat

        return sorted({hf_compat.attn_implementation(m.config) for m in state.cache["runner"].model.modules()
                       if hasattr(m, "config")})

    assert wb.apply(implementations, stream=False) == [["eager"], ["eager"]]


def _vocab_parallel_argmax(state):
    """greedy_tokens on hand-made logits: ties across and within slices, a slice with nothing."""
    import torch

    from mpbook.engine.runner import VocabShard
    from mpbook.parallel.collectives import Group
    from mpbook.parallel.vocab import all_gather_logits, gather_logits, greedy_tokens
    from mpbook.units import shard_range

    group = Group(None, rank=state.rank, size=state.world_size)
    cases = {
        "tie_across_slices": torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0]]),
        "tie_within_slice": torch.tensor([[1.0, 1.0, 3.0, 3.0, 0.5]]),
        "max_in_last": torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [9.0, 1.0, 2.0, 3.0, 4.0]]),
        "vocab_smaller_than_group": torch.tensor([[2.0]]),
    }
    out = {}
    for name, logits in cases.items():
        mine = shard_range(logits.shape[-1], state.world_size, state.rank)
        start, stop = mine.start, mine.stop
        vocab = VocabShard(start, stop, logits.shape[-1], group)
        local = logits[:, start:stop]
        gathered = gather_logits(local, vocab)  # on the group's first rank only
        out[name] = (greedy_tokens(local, vocab).tolist(), logits.argmax(-1).tolist(),
                     torch.equal(gathered, logits) if state.rank == 0 else gathered is None,
                     torch.equal(all_gather_logits(local, vocab), logits))
    return out


@pytest.mark.cluster
def test_greedy_tokens_over_a_split_vocabulary(wb):
    for per_rank in wb.apply(_vocab_parallel_argmax, stream=False):
        for name, (got, want, gathered, all_gathered) in per_rank.items():
            assert got == want, name
            assert gathered and all_gathered, name


def _shards_against_dtensor(state, folder, plans=None):
    """Each rank's shard of every tp-split parameter of a Mixtral layer == DTensor's local shard
    under transformers' own placement for the style (packed_colwise: _StridedShard)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from mpbook.compat.torch import strided_shard
    from mpbook.models import load_config
    from mpbook.models.checkpoint import Checkpoint
    from mpbook.models.parts import rank_part
    from mpbook.models.structure import meta_model, param_rule, structure

    config = load_config(folder)
    model = meta_model(config)
    s = structure(model, plans)
    layout = Layout(tp=state.world_size)
    part = rank_part(s, layout, layout.coords(state.rank))
    ckpt = Checkpoint(folder, model)
    mesh = init_device_mesh("cpu", (state.world_size,))
    compared = []
    for name, param in model.named_parameters():
        style = param_rule(name, part.tp_plan)
        if style is None:
            continue
        whole = ckpt.read(name)
        ndim = whole.dim()
        placement = {
            "colwise": Shard(ndim - 2 if ndim > 1 else 0),
            "rowwise": Shard(ndim - 1) if not name.endswith("bias") else Replicate(),
            "embedding_rowwise": Shard(0),
            "packed_colwise": strided_shard(ndim - 2, split_factor=2),
        }.get(style)
        if placement is None:
            continue
        theirs = distribute_tensor(whole, mesh, [placement]).to_local()
        ours = ckpt.read(name, part.pieces(name, tuple(whole.shape)))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        compared.append(style)
    return sorted(set(compared)), len(compared)


@pytest.mark.cluster
def test_shards_are_the_ones_dtensor_makes(wb):
    # Mixtral's own plan split its experts up to transformers 5.24 (from 5.25 they are
    # replicated): where it no longer does, the same rules come as a user's plan.
    plans = None if experts_in_tp_plan("mixtral") else {"tp": EXPERTS_TP_PLAN}
    styles, count = wb.apply(_shards_against_dtensor, family_folder("mixtral"), plans, stream=False)[0]
    assert styles == ["colwise", "embedding_rowwise", "packed_colwise", "rowwise"]
    assert count == 1 + LAYERS * 6 + 1  # embedding, q/k/v/o + experts gate_up/down per layer, head


# Mixtral's expert rules in transformers 5.24's tp plan.
EXPERTS_TP_PLAN = {"layers.*.mlp.experts.gate_up_proj": "packed_colwise", "layers.*.mlp.experts.down_proj": "rowwise",
                   "layers.*.mlp.experts": "moe_tp_experts"}
