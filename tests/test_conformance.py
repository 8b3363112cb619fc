"""The families table is measured: tiny random checkpoints of transformers' causal-LM types
(shrunk from each family's default config, nothing named per family), every strategy on real
engines against one device (mpbook.conformance).

The default suite re-measures a few types a day (a different slice each day, so that every type
comes round) and holds them to the committed report, which the README's table is made from;
``pytest -m conformance`` runs the whole sweep (every type on 2 engines, a sample on 4).
"""

from __future__ import annotations

import datetime
import math

import pytest
from cluster_probe import collective_timeout

from mpbook import MpbookError, conformance
from mpbook.conformance import REPORT, Cell, Report, Row

README = REPORT.parents[1] / "README.md"
DAILY = 3  # types re-measured by the default suite each day


def committed() -> Report:
    return Report.from_json(REPORT.read_text())


# ----------------------------------------------------------------------------- no engines
@pytest.mark.parametrize("model_type", ["gpt2", "deepseek_v3", "gemma3_text", "qwen3_moe", "falcon"])
def test_a_shrunk_config_is_tiny_and_keeps_what_makes_its_family(model_type):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mpbook.models.shrink import LAYERS, shrink_config
    from mpbook.models.support import num_experts
    from mpbook.models.tokenizer import TOKENIZER_IDS

    config = shrink_config(model_type)
    default = AutoConfig.for_model(model_type)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == (model_type, TOKENIZER_IDS["vocab_size"],
                                                                               LAYERS)
    assert config.hidden_size == 64 and config.num_attention_heads == 4
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    if num_experts(default):
        assert num_experts(config) == 4
    if getattr(default, "layer_types", None):  # every kind of layer the family mixes is kept
        assert set(config.layer_types) == set(default.layer_types)
    if model_type == "deepseek_v3":  # derived sizes follow the ones they come from
        assert config.head_dim == config.qk_rope_head_dim and config.qk_head_dim == (
            config.qk_rope_head_dim + config.qk_nope_head_dim)


def test_four_engines_get_heads_and_kv_heads_that_four_divide():
    from mpbook.models.shrink import shrink_config

    llama = shrink_config("llama", engines=4)  # multi-head by default: a KV head per query head
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.hidden_size) == (8, 8, 128)
    mistral = shrink_config("mistral", engines=4)  # grouped-query attention stays grouped
    assert (mistral.num_attention_heads, mistral.num_key_value_heads) == (8, 4)


def test_the_rotating_sample_covers_every_type():
    types = conformance.causal_lm_types()
    days = math.ceil(len(types) / DAILY)
    today = datetime.date.today().toordinal()
    seen = {t for day in range(today, today + days) for t in conformance.rotating_sample(types, DAILY, day=day)}
    assert seen == set(types)
    assert len(conformance.rotating_sample(types, DAILY)) == DAILY


def test_the_readme_table_is_the_committed_sweep():
    report = committed()
    assert conformance.readme_table(README) == conformance.markdown(report).strip(), (
        "the README's families table differs from docs/conformance.json: run "
        "`python -m mpbook conformance --from docs/conformance.json --readme README.md`"
    )
    assert report.counts()["fails"] == 0, [conformance.row_line(r) for r in report.rows
                                           if any(c.status == "fails" for c in r.cells.values())]


def test_the_committed_sweep_covers_every_type_transformers_ships():
    import transformers

    report = committed()
    assert report.transformers == transformers.__version__, (
        f"the sweep was measured with transformers {report.transformers}; this is {transformers.__version__}: run "
        "`python -m mpbook conformance --json docs/conformance.json` again")
    assert [r.model_type for r in report.rows] == conformance.causal_lm_types()


def test_the_table_says_each_cell_and_why():
    rows = [
        Row("a", 2, {"data": Cell("yes"), "pipeline": Cell("refused", "pp=2: a has no plan; a works with data | x")}),
        Row("b", 2, not_built="Class validation error"),
    ]
    report = Report("5.0", "2.13", "2026-12-03", 120.0, rows)
    four = Report("5.0", "2.13", "2026-12-04", 60.0, [Row("a", 4, {"tp x pp": Cell("fails", "on the engines: boom")})])
    table = conformance.markdown(Report.merged([report, four])).splitlines()
    assert table[0].startswith("Measured 2026-12-04 with transformers 5.0 and torch 2.13 (`python -m mpbook "
                               "conformance`, 2 model types in 3 min")
    assert "1 cells yes, 1 refused, 1 fail; 1 types" in table[0]
    assert table[2:] == [
        "| `model_type` | data | pipeline | tp x pp |",
        "|---|---|---|---|",
        "| `a` | yes | refused: no plan | fails: on the engines: boom |",
        "| `b` | not built: Class validation error |  |  |",
    ]
    assert Report.from_json(report.to_json()) == report


def test_the_command_refuses_an_unknown_type_before_starting_engines():
    with pytest.raises(MpbookError, match=r"^--types: llama9 is not a causal-LM model type of transformers "):
        conformance.sweep(["llama9"])
    with pytest.raises(MpbookError, match=r"^--engines 3: the sweep runs on 2 engines .* choose 2 or 4$"):
        conformance.sweep(["llama"], engines=3)


def test_a_model_that_counts_positions_from_padding_refuses_prompts_of_different_lengths():
    """BART's family decoders take no position_ids: a left-padded row's positions would shift."""
    from mpbook.models.shrink import shrink_config
    from mpbook.models.support import padding_problem

    bart = shrink_config("bart")
    assert padding_problem(bart, [5, 9, 5]) == (
        "bart's forward takes no position_ids (it counts positions from the batch's first column), so the left "
        "padding of prompts of different lengths (5 to 9 tokens) would change their outputs; give prompts of one "
        "length, or one prompt per run")
    assert padding_problem(bart, [7, 7]) is None
    # ALiBi (BLOOM) and a state-space model (Mamba) read the attention mask: no refusal
    assert [padding_problem(shrink_config(t), [5, 9]) for t in ("llama", "bloom", "mamba")] == [None] * 3


def test_a_multimodal_models_decoder_layers_are_found_for_tensor_parallel():
    """Gemma 3 keeps its layers in model.language_model.layers: tensor parallel needs no
    pipeline order to find them (it was refused with NoPipeline); pipeline says why not."""
    from mpbook.models.shrink import shrink_config
    from mpbook.models.structure import structure
    from mpbook.models.support import supported_strategies, why_not

    config = shrink_config("gemma3")
    s = structure(config)
    assert (s.layers, s.pp_source, s.num_layers) == ("language_model.layers", "nested", 4)
    assert all(k.startswith("model.language_model.layers.") for k in s.layer_rules) and s.layer_rules
    assert supported_strategies(config) == ("data", "tensor")
    assert why_not(config, "pipeline") == (
        "gemma3's decoder layers sit inside language_model (not a child of its base model, where its pp plan names "
        "modules), so mpbook cannot order its stages")


def test_a_layout_measured_failing_is_refused_with_its_cause():
    from mpbook.models import check_layout
    from mpbook.models.shrink import shrink_config
    from mpbook.models.support import measured_refusals_lifted, why_not
    from mpbook.layout import Layout

    doge = shrink_config("doge")
    with pytest.raises(MpbookError, match=r"^tp=2: doge: its plan splits dt_proj by rows, .*; `python -m mpbook "
                                          r"conformance --types doge --remeasure` measures it again; doge works with "
                                          r"data, pipeline parallelism"):
        check_layout(doge, Layout(tp=2))
    with measured_refusals_lifted():
        assert why_not(doge, "tensor") is None


def test_roberta_numbers_its_positions_after_its_padding_index():
    """RoBERTa's family keeps the padding index as a row of its position table and numbers a
    prompt's tokens from the row after it: a stage adds that offset to mpbook's positions."""
    import torch
    from transformers import AutoModelForCausalLM

    from mpbook.models.loading import position_offset
    from mpbook.models.shrink import shrink_config

    offsets = {}
    for model_type in ("roberta", "camembert", "llama", "gpt2"):
        with torch.device("meta"):
            offsets[model_type] = position_offset(AutoModelForCausalLM.from_config(shrink_config(model_type)))
    pad = shrink_config("roberta").pad_token_id
    assert offsets == {"roberta": pad + 1, "camembert": pad + 1, "llama": 0, "gpt2": 0}


# ----------------------------------------------------------------------------- on engines
def assert_as_committed(report: Report) -> None:
    """No cell fails, and each measured cell says what the committed report (the README) says."""
    before = {r.model_type: r for r in committed().rows}
    for row in report.rows:
        assert not any(c.status == "fails" for c in row.cells.values()), conformance.row_line(row)
        old = before[row.model_type]
        assert row.not_built == old.not_built, conformance.row_line(row)
        got = {k: c.status for k, c in row.cells.items()}
        want = {k: c.status for k, c in old.cells.items() if k in got}
        assert got == want, (conformance.row_line(row), "the README's table says otherwise: run the sweep again")


@pytest.mark.cluster
def test_todays_types_run_as_the_table_says(workbench):
    built = [r.model_type for r in committed().rows if not r.not_built]
    report = conformance.sweep(conformance.rotating_sample(built, DAILY), wb=workbench)
    assert len(report.rows) == DAILY and all(r.cells for r in report.rows)
    assert_as_committed(report)


@pytest.mark.cluster
@pytest.mark.conformance
@pytest.mark.timeout(3600)  # the whole sweep: 4-13 minutes measured, past the suite's 600 s per test under load
def test_every_type_runs_as_the_table_says(workbench):
    report = conformance.sweep(wb=workbench)
    assert_as_committed(report)


@pytest.mark.cluster
@pytest.mark.conformance
def test_a_sample_combines_tp_with_pp_and_ep_on_four_engines(wb4):
    four = sorted(r.model_type for r in committed().rows if "tp x pp" in r.cells)
    assert four, "the committed report has no 4-engine sample: run `python -m mpbook conformance --engines 4`"
    report = conformance.sweep(four, engines=4, wb=wb4)
    assert any(c.status == "yes" for r in report.rows for c in r.cells.values())
    assert_as_committed(report)


@pytest.fixture
def timeout_15s(workbench):
    """The shared workbench whose collectives give up after 15 s (the failed run below waits for
    that timeout: the default 60 s would be spent waiting), for one test."""
    with collective_timeout(workbench, 15.0):
        yield workbench


@pytest.mark.cluster
def test_a_pipeline_run_after_a_failed_one_gets_its_own_activations(timeout_15s, tmp_path):
    """Found by the sweep: a stage that failed to load left the first stage's send pending in
    MPI, and the next run's receive took that stale activation (the group was not formed again
    after mpbook's own MPI timeout). Now the group is formed again and the next run is right."""
    workbench = timeout_15s
    import torch
    from safetensors.torch import load_file, save_file

    from mpbook import MpbookError
    from mpbook.reference import reference

    good = tmp_path / "llama"
    conformance.build_checkpoint("llama", good)
    broken = tmp_path / "broken"
    conformance.build_checkpoint("llama", broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.norm.weight"]  # only the last stage needs it
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MpbookError, match="the checkpoint has no tensor model.norm.weight"):
        workbench.forward(list(conformance.PROMPTS), strategy="pipeline", model=str(broken), microbatches=1)
    want_logits, want_tokens = reference(str(good), list(conformance.PROMPTS), max_new_tokens=conformance.NEW_TOKENS)
    got = workbench.forward(list(conformance.PROMPTS), strategy="pipeline", model=str(good), microbatches=1)
    for g, w in zip(got.logits, want_logits):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    generated = workbench.generate(list(conformance.PROMPTS), strategy="pipeline", model=str(good),
                                   max_new_tokens=conformance.NEW_TOKENS)
    assert generated.token_ids == want_tokens
