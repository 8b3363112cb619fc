"""Each Linear weight of a CPU model stored in the order its forward streams fastest.

transformers stores a Linear's weight as (out, in), row after row, and ``F.linear`` hands it to
the CPU BLAS (MKL's sgemm in torch's x86 wheels). With few rows of input, the usual case of a
decode step, sgemm streams the same weight markedly faster when it is stored column after
column (the same logical (out, in) tensor with strides (1, out), so that ``F.linear`` reads
its transpose as a contiguous (in, out) matrix); with more rows the row order wins. Measured
on the 2-core AVX2 VM, one thread, float32, every weight of a 30-layer 135M Llama (538 MB),
time with columns against rows:

=========== ===== ===== ===== ===== ===== =====
rows         1     2     3     4     8     16
columns     0.81  0.66  0.67  1.26  1.16  1.04
=========== ===== ===== ===== ===== ===== =====

(greedy ``generate`` of that model: 1 row 0.95x, 3 rows 0.80x, 4 rows 1.13x; a 64-row
prefill 1.05x.) So before each run a CPU engine puts its float32 Linear weights in the order
for the rows each of its forward passes carries (:data:`COLUMNS_UP_TO_ROWS`), copying only
when the order changes, onto huge pages as after loading (:mod:`.huge_pages`). The values
are the same; a product sums in another order, so logits move by float32 rounding (as they
do between layouts anyway) and stay within the tests' 1e-4 of one device.

Tied weights (the head and the token embedding) are one tensor and move once; an embedding
looks rows up in a column-major weight as well (22 us against 5 for three tokens of a
49,152-entry table). Other dtypes run on other kernels and keep transformers' order.
"""

from __future__ import annotations

from . import huge_pages

# The most rows per forward for which a weight is stored column-major (the table above).
COLUMNS_UP_TO_ROWS = 3


def column_order(rows: int) -> bool:
    """Whether a forward of ``rows`` rows runs faster with column-major weights."""
    return rows <= COLUMNS_UP_TO_ROWS


def column_major(tensor) -> bool:
    """A 2-D tensor stored column after column (its transpose is contiguous)."""
    return tensor.dim() == 2 and tensor.shape[0] > 1 and tensor.t().is_contiguous()


def order_weights(model, rows: int) -> int:
    """Store ``model``'s float32 CPU Linear weights in the order for ``rows`` rows per forward;
    the bytes copied (0 when every weight already is)."""
    import torch

    columns = column_order(rows)
    copied = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if not _orderable(weight) or column_major(weight) == columns:
            continue  # (a tied weight seen before is already in order)
        weight.data = _reordered(weight.data, columns=columns)
        copied += weight.numel() * weight.element_size()
    return copied


def _orderable(weight) -> bool:
    import torch

    return (type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and weight.shape[0] > 1 and weight.shape[1] > 1
            and (weight.is_contiguous() or column_major(weight)))


def _reordered(weight, *, columns: bool):
    """The same values in a new tensor stored column- (``columns``) or row-major."""
    if columns:
        out = huge_pages.empty((weight.shape[1], weight.shape[0]), weight.dtype)
        out.copy_(weight.t())
        return out.t()
    out = huge_pages.empty(tuple(weight.shape), weight.dtype)
    out.copy_(weight)
    return out
