"""Each Linear weight of a CPU model stored as its forward streams it fastest.

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
prefill 1.05x.) oneDNN's packed layout (:mod:`.packed_linear`) beats both from 2 rows on, for
a weight of some size: each packed product also pays about 15 us of oneDNN's own, against 3-5
for a dense one, which outweighs what packing saves below :data:`PACKED_FROM_ELEMENTS`
(one thread, 4-8 rows: 256 x 512 ties, 192 x 576 runs 1.1-1.2x slower packed, 576 x 576 1.4x
faster). Left dense, the `small` preset's attention projections (32-64 x 512) made decode
steps 1.05x faster in data parallel and 1.09x in tensor parallel (2 engines, interleaved).
So before each run a CPU engine puts its float32 Linear weights in the store for the rows each
of its forward passes carries: packed from :data:`PACKED_FROM_ROWS` rows where the layer can
be and is that big, else column-major up to :data:`COLUMNS_UP_TO_ROWS` rows and row-major
above, changing only what is not already so, dense weights onto huge pages as after loading
(:mod:`.huge_pages`); at one row, a column-major weight's product runs on OpenBLAS where that
streams it faster (:mod:`.one_row_linear`).
The values are the same; a product sums in another order, so logits move by float32 rounding
(as they do between layouts anyway) and stay within the tests' 1e-4 of one device.

Tied weights (the head and the token embedding) are one tensor, never packed, and move once;
an embedding looks rows up in a column-major weight as well (22 us against 5 for three tokens
of a 49,152-entry table). Other dtypes run on other kernels and keep transformers' order.
"""

from __future__ import annotations

from . import huge_pages

# The most rows per forward for which a dense weight is stored column-major (the table above).
COLUMNS_UP_TO_ROWS = 3
# From this many rows per forward a weight is packed for oneDNN where it can be (packed_linear).
PACKED_FROM_ROWS = 2
# And only weights of at least this many elements (512 KiB of float32): see above.
PACKED_FROM_ELEMENTS = 1 << 17


def pays_to_pack(module) -> bool:
    """Whether a Linear layer's weight is big enough for its packed product to beat the dense one."""
    return module.in_features * module.out_features >= PACKED_FROM_ELEMENTS


def column_order(rows: int) -> bool:
    """Whether a forward of ``rows`` rows runs faster with column-major weights."""
    return rows <= COLUMNS_UP_TO_ROWS


def column_major(tensor) -> bool:
    """A 2-D tensor stored column after column (its transpose is contiguous)."""
    return tensor.dim() == 2 and tensor.shape[0] > 1 and tensor.t().is_contiguous()


def order_weights(model, rows: int, *, pack: bool = True) -> int:
    """Store ``model``'s float32 CPU Linear weights as a forward of ``rows`` rows streams them
    fastest: packed for oneDNN from 2 rows on (:mod:`.packed_linear`, where ``pack`` and this
    torch allow, the layer runs its own forward and its weight is big enough), else column- or
    row-major, and at one row computed by OpenBLAS where ``pack`` and the libraries allow
    (:mod:`.one_row_linear`); the bytes copied (0 when every weight already is as wanted).
    ``pack=False`` keeps every product on ``F.linear`` with a plain weight."""
    import torch

    from . import one_row_linear, packed_linear

    packing = pack and rows >= PACKED_FROM_ROWS and packed_linear.available()
    columns = column_order(rows)
    on_openblas = pack and rows == 1 and one_row_linear.usable()
    # A tied weight is also the embedding table; a weight its family reads by name cannot be packed.
    tied, read = (_tied(model), packed_linear.weight_read_by_name(model)) if packing else (set(), set())
    copied = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        one_row_linear.detach(module)  # attached again below where this run's rows still want it
        if packed_linear.is_packed(module):
            if packing and pays_to_pack(module):
                continue
            packed_linear.unpack(module)  # row-major, ordered below
        elif (packing and pays_to_pack(module) and id(module.weight) not in tied and id(module) not in read
              and packed_linear.packable(module)):
            copied += packed_linear.pack(module, rows)
            continue
        weight = module.weight
        if _orderable(weight) and column_major(weight) != columns:  # (a tied weight seen before is in order)
            weight.data = _reordered(weight.data, columns=columns)
            copied += weight.numel() * weight.element_size()
        # (packable: a plain float32 CPU weight, and nn.Linear's forward or a wrapper's product())
        if on_openblas and packed_linear.packable(module) and column_major(module.weight):
            one_row_linear.attach(module)
    return copied


def unpack_weights(model) -> int:
    """Every Linear weight packed for oneDNN made a plain (row-major) tensor again, each as it
    was before packing, and every product back on ``F.linear``; the bytes unpacked."""
    import torch

    from . import one_row_linear, packed_linear

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        one_row_linear.detach(module)  # every product back on F.linear
        if packed_linear.is_packed(module):
            weight = packed_linear.unpack(module)
            unpacked += weight.numel() * weight.element_size()
    return unpacked


def _tied(model) -> set[int]:
    """The parameters (by id) that more than one module holds: a tied head and embedding."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


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
