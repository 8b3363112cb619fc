"""A CPU Linear layer's one-row product on OpenBLAS's matrix-vector kernel.

A decode step of one row (a replica with one prompt, a pipeline micro-batch of one) is a
matrix-vector product per Linear layer, and it runs as fast as the weight streams from memory.
torch's x86 wheels hand ``F.linear`` to MKL's sgemm, which streams a column-major weight
(:mod:`.weight_order`'s store for few rows) well below what memory allows at one row.
numpy's wheels carry OpenBLAS, whose sgemv streams the same bytes faster. Measured on the
2-core VM, one thread, float32, the weight stored column-major, one row, time with OpenBLAS
against MKL in one run:

============== ===== ===== ====== ====== ====== ====== =======
weight (out,in) 192,  576,  1536,  576,   512,   1408,  49152,
                576   576   576    1536   512    512    576
OpenBLAS        0.71  0.75  0.79   0.78   0.72   1.00   1.00
============== ===== ===== ====== ====== ====== ====== =======

Every Linear of a 30-layer 135M Llama (538 MB) streamed at 18.4-19.0 GB/s against 14.6-14.9
(a plain sum of as many bytes: 24 GB/s); three such processes at once, 32-35 GB/s in all
against 28-30. Greedy ``generate`` of one prompt, interleaved: that Llama 1.10-1.15x the
tokens/s, the `small` preset 1.06-1.08x, the same tokens. From two rows on MKL is ahead
(1.3-3x for the larger weights), and the store is oneDNN's packed one anyway.

So where this is that combination (torch on MKL, numpy on OpenBLAS, an x86 CPU) and an engine
computes with one intra-op thread, :func:`attach` gives a float32 Linear layer whose weight is
stored column-major a forward that sends a one-row input through ``numpy.matmul``, without
copying the weight: numpy reads the tensor's own memory. Any other input (a prefill, more rows,
a traced graph under ``torch.compile``, one that needs gradients) takes ``F.linear`` as before.
OpenBLAS is held to one thread, as the engine's torch is. The product sums in another order,
so logits move by float32 rounding, within the tests' 1e-4 of one device.
"""

from __future__ import annotations

import functools
import platform
import types

import torch

# Set on a layer whose one-row products go through OpenBLAS: on a plain Linear its forward is
# this module's; on one whose forward a layout wrapped, the wrapper's packed_linear.product asks.
ATTACHED = "one_row_product_on_openblas"


def numpy_blas() -> str:
    """The name of the BLAS numpy was built with ("scipy-openblas" for the wheels from PyPI)."""
    import numpy

    try:
        return str(numpy.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", ""))
    except (KeyError, TypeError, ValueError):  # a numpy too old to say (mode= came in 1.26)
        return ""


@functools.lru_cache(maxsize=1)
def libraries_fit() -> bool:
    """torch's BLAS is MKL and numpy's is OpenBLAS, on x86: the pair measured above."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available():
        return False
    return "openblas" in numpy_blas().lower()


@functools.lru_cache(maxsize=1)
def _hold_openblas_to_one_thread() -> None:
    import threadpoolctl

    # OpenBLAS threads its sgemv from ~9,000 elements on: the engine's one thread, not the machine's.
    threadpoolctl.ThreadpoolController().select(internal_api="openblas").limit(limits=1)


def usable() -> bool:
    """Whether one-row products run on OpenBLAS here: the libraries above, and one intra-op
    thread (an engine's; with more, MKL's own threading is what was measured). Where they
    do, OpenBLAS is held to that one thread."""
    if torch.get_num_threads() != 1 or not libraries_fit():
        return False
    _hold_openblas_to_one_thread()
    return True


def attached(module) -> bool:
    return getattr(module, ATTACHED, False)


def attach(module) -> None:
    """Send the one-row products of ``module`` (a float32 CPU ``nn.Linear`` whose weight is
    column-major) to OpenBLAS: through its own forward, or, where a layout's wrapper replaced
    it, through the wrapper's ``packed_linear.product``, which asks :func:`attached`."""
    setattr(module, ATTACHED, True)
    if "forward" not in vars(module):
        module.forward = types.MethodType(_forward, module)


def detach(module) -> None:
    """``module``'s products back on ``F.linear``."""
    if getattr(vars(module).get("forward"), "__func__", None) is _forward:
        del module.forward
    vars(module).pop(ATTACHED, None)


def one_row(x) -> bool:
    """An input this module computes: one float32 row, no gradient, not being traced."""
    return (x.numel() == x.shape[-1] and x.dtype == torch.float32 and not x.requires_grad
            and not torch.compiler.is_compiling())


def product(weight, x):
    """``x`` (one row) times ``weight`` (column-major, transposed), by OpenBLAS's sgemv."""
    import numpy

    # weight.t() is the contiguous (in, out) matrix: numpy reads it where it lies.
    out = numpy.matmul(x.reshape(-1).numpy(), weight.detach().t().numpy())
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[0])


def _forward(self, x):
    if not one_row(x):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = product(self.weight, x)
    return out if self.bias is None else out.add_(self.bias)
