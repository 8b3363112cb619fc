"""Each Linear weight of a CPU model stored as a run's rows stream it fastest
(mpbook.models.weight_order, mpbook.models.packed_linear): a real model from from_pretrained,
its weights stored column-major, packed for oneDNN and back, the values unchanged, ties kept,
the same tokens, eager and compiled; the engines store their weights so before each run."""

from __future__ import annotations

import pytest
import torch

from mpbook import models
from mpbook.models.huge_pages import HUGE_PAGE, available, huge_page_bytes
from mpbook.models import packed_linear
from mpbook.models.weight_order import COLUMNS_UP_TO_ROWS, PACKED_FROM_ELEMENTS, column_major, order_weights


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

    copied = order_weights(lm, rows=COLUMNS_UP_TO_ROWS, pack=False)

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
    assert order_weights(lm, rows=COLUMNS_UP_TO_ROWS + 1, pack=False) == copied
    assert all(w.is_contiguous() for w in linear_weights(lm))
    for name, t in lm.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_weights_are_packed_for_several_rows_and_given_back_bit_for_bit():
    lm = models.load_whole("small", dtype=torch.float32, device=torch.device("cpu"))
    if not packed_linear.available():
        pytest.skip("this torch has no oneDNN on the CPU: weights stay dense")
    before = {name: t.clone() for name, t in lm.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12], [3, 6, 9, 12, 15, 18], [7, 7, 7, 7, 7, 7]])
    with torch.inference_mode():
        logits_before = lm(ids).logits
        tokens_before = lm.generate(ids, max_new_tokens=8, do_sample=False)

    packed = order_weights(lm, rows=4)

    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    head = lm.get_output_embeddings()
    assert head.weight is lm.get_input_embeddings().weight  # tied: also the embedding, so dense
    assert not packed_linear.is_packed(head) and head.weight.is_contiguous()
    others = [m for m in linears if m is not head]
    # The MLP's 1536 x 512 products are packed; the attention's 32-64 x 512 run faster dense.
    big = [m for m in others if m.in_features * m.out_features >= PACKED_FROM_ELEMENTS]
    small = [m for m in others if m not in big]
    assert {m.out_features for m in big} == {512, 1536} and {m.out_features for m in small} == {32, 64, 512}
    assert all(packed_linear.is_packed(m) and m.weight.is_meta for m in big)
    assert not any(packed_linear.is_packed(m) for m in small) and all(m.weight.is_contiguous() for m in small)
    assert packed == sum(m.weight.numel() * m.weight.element_size() for m in big)
    with torch.inference_mode():
        torch.testing.assert_close(lm(ids).logits, logits_before, rtol=1e-4, atol=1e-4)
        assert torch.equal(lm.generate(ids, max_new_tokens=8, do_sample=False), tokens_before)
    assert order_weights(lm, rows=8) == 0  # packed already: nothing copied

    order_weights(lm, rows=1)  # one row: dense again, column-major
    assert not any(packed_linear.is_packed(m) for m in linears)
    assert all(column_major(m.weight) for m in linears)
    for name, t in lm.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_a_packed_layer_compiles_to_the_eager_result():
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(3, 1, 64)
    if not packed_linear.available():
        pytest.skip("this torch has no oneDNN on the CPU: weights stay dense")
    with torch.inference_mode():
        want = layer(x)
        packed_linear.pack(layer, rows=3)
        compiled = torch.compile(lambda t: layer(t) * 2, dynamic=False)
        torch.testing.assert_close(compiled(x), want * 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_a_layer_with_a_forward_of_its_own_is_not_packed():
    """A tensor-parallel row-wise layer reads its weight in mpbook's wrapper: it stays dense."""
    layer = torch.nn.Linear(64, 48)
    layer.forward = lambda x: torch.nn.functional.linear(x, layer.weight)
    assert not packed_linear.packable(layer)
    order_weights(torch.nn.ModuleList([layer]), rows=4)
    assert not packed_linear.is_packed(layer) and not layer.weight.is_meta


def _one_thread_openblas():
    """Skips (saying why) where one-row products cannot run on OpenBLAS; torch on one thread."""
    from mpbook.models import one_row_linear

    if not one_row_linear.libraries_fit():
        pytest.skip("one-row products run on OpenBLAS only with torch on MKL and numpy on OpenBLAS, on x86; "
                    f"here: torch MKL {torch.backends.mkl.is_available()}, numpy's BLAS "
                    f"{one_row_linear.numpy_blas() or 'unknown'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def test_one_row_products_run_on_openblas_with_the_same_tokens_and_go_back_to_f_linear():
    from mpbook.models import one_row_linear
    from mpbook.models.weight_order import unpack_weights

    threads = _one_thread_openblas()
    try:
        lm = models.load_whole("small", dtype=torch.float32, device=torch.device("cpu"))
        ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
        with torch.inference_mode():
            logits_before = lm(ids[:, :1]).logits
            tokens_before = lm.generate(ids, max_new_tokens=12, do_sample=False)
        linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]

        order_weights(lm, rows=1)

        assert all(one_row_linear.attached(m) and column_major(m.weight) for m in linears)
        assert all("forward" in vars(m) for m in linears)
        layer = linears[0]
        x = torch.randn(1, 1, layer.in_features)
        with torch.inference_mode():
            # The layer's one-row product is OpenBLAS's, bit for bit; more rows are F.linear's.
            openblas = torch.from_numpy(x.reshape(-1).numpy() @ layer.weight.t().numpy())
            assert torch.equal(layer(x).reshape(-1), openblas + (0 if layer.bias is None else layer.bias))
            two = torch.randn(2, layer.in_features)
            assert torch.equal(layer(two), torch.nn.functional.linear(two, layer.weight, layer.bias))
            torch.testing.assert_close(lm(ids[:, :1]).logits, logits_before, rtol=1e-5, atol=1e-5)
            assert torch.equal(lm.generate(ids, max_new_tokens=12, do_sample=False), tokens_before)
            # Traced by torch.compile, the layer is F.linear's product.
            compiled = torch.compile(lambda t: layer(t) * 2, dynamic=False)
            torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias) * 2,
                                       rtol=1e-5, atol=1e-5)

        order_weights(lm, rows=2)  # more rows: packed or row-major, every product back on F.linear
        assert not any(one_row_linear.attached(m) or "forward" in vars(m) and not packed_linear.is_packed(m)
                       for m in linears)
        order_weights(lm, rows=1, pack=False)  # plain weights and F.linear asked for
        assert not any(one_row_linear.attached(m) or "forward" in vars(m) for m in linears)
        order_weights(lm, rows=1)
        unpack_weights(lm)
        assert not any(one_row_linear.attached(m) or "forward" in vars(m) for m in linears)
        torch.set_num_threads(2)  # MKL's own threads are what was measured with more than one
        order_weights(lm, rows=1)
        assert not any(one_row_linear.attached(m) for m in linears)
    finally:
        torch.set_num_threads(threads)


def test_a_wrapped_layer_computes_its_one_row_product_on_openblas_through_its_wrapper():
    """A tensor-parallel row-wise layer keeps its wrapper: the wrapper's product() asks."""
    from mpbook.models import one_row_linear

    threads = _one_thread_openblas()
    try:
        layer = torch.nn.Linear(64, 48, bias=False).requires_grad_(False)
        wrapper = lambda x: packed_linear.product(layer, x) * 2  # noqa: E731
        layer.forward = wrapper
        setattr(layer, packed_linear.WRAPPED, True)
        order_weights(torch.nn.ModuleList([layer]), rows=1)
        assert one_row_linear.attached(layer) and layer.forward is wrapper
        x = torch.randn(1, 64)
        with torch.inference_mode():
            openblas = torch.from_numpy(x.reshape(-1).numpy() @ layer.weight.t().numpy())
            assert torch.equal(layer(x).reshape(-1), openblas * 2)
        order_weights(torch.nn.ModuleList([layer]), rows=4, pack=False)
        assert not one_row_linear.attached(layer) and layer.forward is wrapper
    finally:
        torch.set_num_threads(threads)


def test_other_dtypes_keep_transformers_order():
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert order_weights(layer, rows=1) == 0 and layer.weight.is_contiguous()


def runner_weight_order(state):
    import torch

    from mpbook.models.weight_order import column_major

    from mpbook.models.one_row_linear import attached
    from mpbook.models.packed_linear import is_packed

    linears = [m for m in state.cache["runner"].model.modules() if isinstance(m, torch.nn.Linear)]
    return sorted({"packed" if is_packed(m) else ("openblas" if attached(m) else "columns") if column_major(m.weight)
                   else "rows" if m.weight.is_contiguous() else "other" for m in linears})


def _one_row_usable(state):
    from mpbook.models.one_row_linear import usable

    return usable()


def engines_one_row(workbench) -> str:
    """How the engines store (and compute) a one-row run's weights: column-major, on OpenBLAS
    where their libraries and their one thread allow (mpbook.models.one_row_linear)."""
    return "openblas" if all(workbench.apply(_one_row_usable, stream=False)) else "columns"


@pytest.mark.cluster
@pytest.mark.parametrize("prompts, stores, compile", [(2, ["one row"], False), (8, ["packed", "rows"], False),
                                                     (8, ["packed", "rows"], True)])
def test_engines_store_their_weights_for_the_rows_of_each_run(workbench, tiny_folder, prompts, stores, compile,
                                                             engines_pack_every_weight):
    """2 prompts on 2 engines: 1 row each, column-major (products on OpenBLAS where the
    engines' libraries allow: engines_one_row). 8: 4 rows each, packed but for the
    tied head (row-major from 4 rows), eager and compiled alike (tiny's weights are all under
    the size from which engines pack: here they pack every one, to run the packed products)."""
    from mpbook.reference import reference

    if "packed" in stores and not packed_linear.available():
        pytest.skip("this torch has no oneDNN on the CPU: weights stay dense")
    texts = ["Hi", "Tensor parallel splits every weight matrix"] * (prompts // 2)
    _, tokens = reference(tiny_folder, texts, max_new_tokens=4)
    result = workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=4, compile=compile)
    assert result.token_ids == tokens
    stores = [engines_one_row(workbench) if store == "one row" else store for store in stores]
    assert workbench.apply(runner_weight_order, stream=False) == [stores] * len(workbench.engines)


@pytest.mark.cluster
def test_a_forward_pass_alone_keeps_the_order_the_weights_have(workbench, tiny_folder):
    """Its rows x prompt tokens run either order within 5%: no copy for it."""
    from mpbook.reference import reference

    texts = ["Hi", "Tensor parallel splits every weight matrix"]
    workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=2)
    one_row = [[engines_one_row(workbench)]] * len(workbench.engines)
    assert workbench.apply(runner_weight_order, stream=False) == one_row
    logits, _ = reference(tiny_folder, texts, max_new_tokens=1)
    result = workbench.forward(texts, strategy="data", model=tiny_folder)
    assert result.logits is not None and len(result.logits) == len(logits) == 2
    for got, want in zip(result.logits, logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert workbench.apply(runner_weight_order, stream=False) == one_row


@pytest.mark.cluster
def test_dense_weights_keep_every_weight_a_plain_tensor(workbench, tiny_folder, engines_pack_every_weight):
    """The way out for a family whose code reads a packed weight: 4 rows each, not packed
    (row-major); a forward pass with it after a packed run unpacks; tokens and logits are one
    device's either way."""
    from mpbook.reference import reference

    if not packed_linear.available():
        pytest.skip("this torch has no oneDNN on the CPU: weights are never packed")
    texts = ["Hi", "Tensor parallel splits every weight matrix"] * 4
    logits, tokens = reference(tiny_folder, texts, max_new_tokens=4)
    dense = workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=4, dense_weights=True)
    assert dense.token_ids == tokens
    assert workbench.apply(runner_weight_order, stream=False) == [["rows"]] * len(workbench.engines)

    assert workbench.generate(texts, strategy="data", model=tiny_folder, max_new_tokens=4).token_ids == tokens
    assert workbench.apply(runner_weight_order, stream=False) == [["packed", "rows"]] * len(workbench.engines)
    forward = workbench.forward(texts, strategy="data", model=tiny_folder, dense_weights=True)
    assert workbench.apply(runner_weight_order, stream=False) == [["rows"]] * len(workbench.engines)
    for got, want in zip(forward.logits, logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_magic_asks_for_dense_weights():
    from mpbook.magics import build_parser

    args = build_parser().parse_args(["tensor", "--dense-weights"])
    assert args.dense_weights is True
    assert build_parser().parse_args(["tensor"]).dense_weights is False
