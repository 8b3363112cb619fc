"""A CPU Linear layer whose weight is packed in oneDNN's blocked layout.

MKL's sgemm (what ``F.linear`` calls on an x86 CPU) takes a plain (out, in) matrix and, for a
few rows of input, streams it well below what memory allows. oneDNN can keep the weight in a
blocked layout made for its own kernels (the layout inductor packs CPU weights into when it
freezes a model), and its product with that layout streams markedly faster from two rows on.
Measured on the 2-core AVX2 VM, one thread, float32, every Linear of a 30-layer 135M Llama
but the tied head (425 MB), time against row-major sgemm, in one run:

=========== ===== ===== ===== ===== ===== =====
rows         1     2     3     4     8     40
packed      0.89  0.83  0.51  0.55  0.61  0.74
columns     0.84  0.99  0.81  1.04  1.16  1.01
=========== ===== ===== ===== ===== ===== =====

(``columns``: the same weights stored column-major, :mod:`.weight_order`'s other store; the
`small` preset's and 1024 x 1024 weights give the same picture, packed ahead from 2 rows on
and columns ahead at 1.) Greedy ``generate`` of the ``small`` preset with 4 rows: 0.64x the
time, logits within 3e-5, the same tokens.

:func:`pack` swaps a layer's dense weight for the packed one in place: the module stays where
it is, so hooks, names and the layout's wrappers around other modules are untouched; its
``forward`` becomes the packed product (oneDNN's own op; under ``torch.compile`` one custom
op, :func:`packed_linear`, which the graph calls as it is), and ``weight`` a placeholder of
the same shape and dtype that holds no bytes (the packed tensor has the dense one's size, so
the weight is held once) and raises on any use, so that code reading the old values fails
loudly instead of reading stale ones (a meta tensor would not: ``F.linear`` of a CPU input
and a meta weight returns garbage). :func:`unpack` gives the dense weight back, bit for bit.

Only a layer that runs ``nn.Linear``'s own ``forward`` (or a wrapper that computes through
:func:`product`, as a tensor-parallel row-wise layer's in :mod:`mpbook.parallel.tensor` does)
is packed, and only where its family's code does not read its weight by name
(:func:`weight_read_by_name`: a router that casts its classifier's weight); a tied weight is
also the token embedding, which looks rows up in it. Those stay dense.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import types

import torch

from ..compat import torch as torch_compat
from . import one_row_linear


@torch.library.custom_op("mpbook::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight`` packed by :func:`pack`."""
    return torch_compat.onednn_linear(x, packed, bias)


@packed_linear.register_fake
def _packed_linear_shape(x, packed, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _linear(x, packed, bias, out_features: int):
    # The custom op is what a compiled graph calls; eagerly, its dispatch (the op's Python
    # wrapper, its dynamo guard) cost 6 us of the 22 a decode step's product took on the 2-core
    # VM, ~0.3 ms per step of the `small` preset's 56 products: eager calls the product itself.
    if torch.compiler.is_compiling():
        return packed_linear(x, packed, bias, out_features)
    return torch_compat.onednn_linear(x, packed, bias)


def available() -> bool:
    """Whether this torch can pack weights for oneDNN (its CPU builds for x86 and Arm can)."""
    return torch_compat.onednn_available()


def is_packed(module) -> bool:
    return getattr(module, "packed_weight", None) is not None


def packable(module) -> bool:
    """A float32 CPU ``nn.Linear`` that runs ``nn.Linear``'s forward, with a plain 2-D weight.

    A subclass with a forward of its own (a family's MoE router returns its choices, not a
    product) and a layer whose forward a layout replaced are left dense."""
    if (not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward
            or is_packed(module) or ("forward" in vars(module) and not getattr(module, WRAPPED, False))):
        return False
    weight = module.weight
    return (type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and min(weight.shape) > 1)


# Set on a layer whose forward a wrapper replaced when the wrapper computes the product through
# product() (mpbook.parallel.tensor's row-wise layers): the layer can be packed all the same.
WRAPPED = "product_through_packed_linear"


def product(module, x):
    """``x`` times ``module``'s weight (transposed), without the bias, packed or dense."""
    if is_packed(module):
        return _linear(x, module.packed_weight, None, module.out_features)
    if one_row_linear.attached(module) and one_row_linear.one_row(x):
        return one_row_linear.product(module.weight, x)
    return torch.nn.functional.linear(x, module.weight)


def _forward(self, x):
    return _linear(x, self.packed_weight, self.bias, self.out_features)


class PackedAway(torch.Tensor):
    """Where a packed layer's ``weight`` was: its shape and dtype, no bytes, no values."""

    ALLOWED = frozenset({torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
                         torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_meta.__get__,
                         torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size,
                         torch.Tensor.__repr__})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.ALLOWED:
            return super().__torch_function__(func, types, args, kwargs or {})
        raise RuntimeError(
            f"{getattr(func, '__name__', func)} read a Linear weight that mpbook packed for oneDNN "
            "(mpbook.models.packed_linear); its layer computes with the packed copy. This family's code reads "
            "the weight some way mpbook's check missed: run with dense_weights=True (%%mp ... --dense-weights) "
            "to keep every weight a plain tensor, and please report it")


def pack(module, rows: int) -> int:
    """Pack ``module``'s weight for products of ``rows`` rows; the bytes packed."""
    weight = module.weight
    module.packed_weight = torch_compat.onednn_pack(weight.detach(), rows)
    del module.weight  # the dense Parameter goes
    placeholder = torch.empty(weight.shape, dtype=weight.dtype, device="meta", requires_grad=weight.requires_grad)
    module.weight = placeholder.as_subclass(PackedAway)
    if "forward" not in vars(module):  # (a wrapper's forward calls product())
        module.forward = types.MethodType(_forward, module)
    return weight.numel() * weight.element_size()


def unpack(module) -> torch.Tensor:
    """Give ``module`` its dense (row-major) weight back; the weight."""
    dense = module.packed_weight.to_dense()
    requires_grad = module.weight.requires_grad
    if getattr(vars(module).get("forward"), "__func__", None) is _forward:
        del module.forward
    del module.weight
    module.packed_weight = None
    module.weight = torch.nn.Parameter(dense, requires_grad=requires_grad)
    return module.weight


def weight_read_by_name(model) -> set[int]:
    """The Linear layers (by id) whose weight the code of their parent's family reads by name
    (``.classifier.weight``): a packed weight cannot be read, so they stay dense."""
    out = set()
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and _named_in_source(type(parent).__module__, child_name):
                out.add(id(child))
    return out


@functools.lru_cache(maxsize=None)
def _named_in_source(module_name: str, attribute: str) -> bool:
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True  # no source to read: assume it does
    return re.search(rf"\b{re.escape(attribute)}\.weight\b", source) is not None
