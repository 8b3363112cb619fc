"""A CPU model's weights on transparent huge pages.

A decode step on a CPU reads every weight once per token, so the step is as fast as memory
streams. Linux maps a process's memory in 4 KiB pages unless asked otherwise: streaming the
538 MB of a 135M-parameter model in float32 then walks 130,000 page-table entries a step, and
with the kernel's usual setting (``/sys/kernel/mm/transparent_hugepage/enabled`` at
``madvise``) torch's allocator never asks. Each large weight is therefore copied once, after
loading, into an anonymous private mapping advised ``MADV_HUGEPAGE`` (2 MiB pages), and the
parameter is pointed at it. Measured on the 2-core VM: a 512 MB matrix-vector stream 4-9%
faster, a 30-layer 135M Llama's greedy decode 7% faster (median of 10 interleaved pairs).

Values are copied bit for bit, so every result is unchanged. Tensors below 2 MiB (norms,
biases, small buffers) cannot fill a huge page and stay where they are. Where the kernel has
huge pages off (``never``), or is not Linux, nothing is done.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this kernel maps an advised region with huge pages."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def place_on_huge_pages(model) -> int:
    """Move ``model``'s large CPU parameters and buffers onto huge pages; the bytes moved.

    A tensor shared by two modules (tied embeddings) is moved once and both see the copy."""
    import torch

    if not available():
        return 0
    moved: dict[int, torch.Tensor] = {}
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if not _movable(tensor):
            continue
        key = tensor.data_ptr()
        if key not in moved:
            moved[key] = _on_huge_pages(tensor.data)
            total += tensor.numel() * tensor.element_size()
        tensor.data = moved[key]
    return total


def _movable(tensor) -> bool:
    """A plain dense CPU tensor that owns its whole storage and fills at least one huge page."""
    import torch

    return (type(tensor.data) is torch.Tensor and tensor.device.type == "cpu" and tensor.layout == torch.strided
            and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            and tensor.numel() * tensor.element_size() >= HUGE_PAGE)


def _on_huge_pages(tensor):
    """A copy of ``tensor`` in its own mapping on huge pages (:func:`empty`)."""
    copy = empty(tensor.shape, tensor.dtype)
    copy.copy_(tensor)  # the tensor keeps the mapping alive; freeing it unmaps the region
    return copy


def empty(shape, dtype):
    """A new contiguous CPU tensor in its own anonymous private mapping advised for huge pages
    (private: a shared anonymous mapping is shmem, which has a huge-page setting of its own),
    starting on a 2 MiB boundary; a plain ``torch.empty`` where it would not fill a huge page
    or the kernel has them off.

    The kernel aligns only mappings whose length is a multiple of 2 MiB, and a huge page backs
    only a whole aligned 2 MiB of the advised range: so the mapping is 2 MiB longer than the
    tensor, the tensor starts at its first boundary, and only the tensor's whole 2 MiB blocks
    are advised (its tail stays on 4 KiB pages, so no page past its end is ever resident)."""
    import math

    import torch

    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < HUGE_PAGE or not available():
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return torch.frombuffer(area, dtype=dtype, count=count, offset=start).view(shape)


def huge_page_bytes(tensor) -> int:
    """Bytes of the mapping that holds ``tensor`` which the kernel backs with huge pages
    (``AnonHugePages`` in ``/proc/self/smaps``, Linux; 0 elsewhere)."""
    address = tensor.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start <= address < end
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
