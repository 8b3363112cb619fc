"""Each Linear weight of a CPU model in the order a run's rows stream fastest
(mpbook.models.weight_order): a real model from from_pretrained, its weights stored column-major
for a few rows and back, the values unchanged, ties kept, the same tokens; the engines order
their weights before each run."""

from __future__ import annotations

import pytest
import torch

from mpbook import models
from mpbook.models.huge_pages import HUGE_PAGE, available, huge_page_bytes
from mpbook.models.weight_order import COLUMNS_UP_TO_ROWS, column_major, order_weights


def linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_weights_go_column_major_for_few_rows_and_back_with_the_same_values_and_tokens():
    lm = models.load_whole("small", dtype=torch.float32, device=torch.device("cpu"))
    before = {name: t.clone() for name, t in lm.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])
    with torch.inference_mode():
        logits_before = lm(ids).logits
        tokens_before = lm.generate(ids, max_new_tokens=8, do_sample=False)
    assert all(w.is_contiguous() for w in linear_weights(lm))  # transformers' order, as loaded

    copied = order_weights(lm, rows=COLUMNS_UP_TO_ROWS)

    weights = linear_weights(lm)
    assert copied == sum({w.data_ptr(): w.numel() * w.element_size() for w in weights}.values()) > 0
    assert all(column_major(w) for w in weights)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    for name, t in lm.state_dict().items():
        assert torch.equal(t, before[name]), name
    with torch.inference_mode():
        torch.testing.assert_close(lm(ids).logits, logits_before, rtol=1e-5, atol=1e-5)
        assert torch.equal(lm.generate(ids, max_new_tokens=8, do_sample=False), tokens_before)
    if available():
        large = [w for w in weights if w.numel() * w.element_size() >= HUGE_PAGE]
        assert large and all(huge_page_bytes(w) >= HUGE_PAGE for w in large)

    assert order_weights(lm, rows=1) == 0  # already in order: nothing copied
    assert order_weights(lm, rows=COLUMNS_UP_TO_ROWS + 1) == copied
    assert all(w.is_contiguous() for w in linear_weights(lm))
    for name, t in lm.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_other_dtypes_keep_transformers_order():
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert order_weights(layer, rows=1) == 0 and layer.weight.is_contiguous()


def runner_weight_order(state):
    import torch

    from mpbook.models.weight_order import column_major

    weights = [m.weight for m in state.cache["runner"].model.modules() if isinstance(m, torch.nn.Linear)]
    return sorted({"columns" if column_major(w) else "rows" if w.is_contiguous() else "other" for w in weights})


@pytest.mark.cluster
@pytest.mark.parametrize("prompts, order", [(2, "columns"), (8, "rows")])
def test_engines_order_their_weights_for_the_rows_of_each_run(workbench, tiny_folder, prompts, order):
    from mpbook.reference import reference

    texts = ["Hi", "Tensor parallel splits every weight matrix"] * (prompts // 2)
    _, tokens = reference(tiny_folder, texts, max_new_tokens=4)
    result = workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=4)
    assert result.token_ids == tokens
    assert workbench.apply(runner_weight_order, stream=False) == [[order]] * len(workbench.engines)


@pytest.mark.cluster
def test_a_forward_pass_alone_keeps_the_order_the_weights_have(workbench, tiny_folder):
    """Its rows x prompt tokens run either order within 5%: no copy for it."""
    from mpbook.reference import reference

    texts = ["Hi", "Tensor parallel splits every weight matrix"]
    workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=2)
    assert workbench.apply(runner_weight_order, stream=False) == [["columns"]] * len(workbench.engines)
    logits, _ = reference(tiny_folder, texts, max_new_tokens=1)
    result = workbench.forward(texts, strategy="data", model=tiny_folder)
    assert result.logits is not None and len(result.logits) == len(logits) == 2
    for got, want in zip(result.logits, logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert workbench.apply(runner_weight_order, stream=False) == [["columns"]] * len(workbench.engines)
