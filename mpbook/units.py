"""Small arithmetic every layer shares: byte counts as text, shard sizes, even splits.

One helper each, so that the planner, the loaders, the dashboard and the results agree to
the byte and to the row.
"""

from __future__ import annotations

UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: int | float | None, *, unit: str | None = None) -> str:
    """``1536`` -> ``"1.5 KiB"``: one decimal in the largest unit the number reaches.

    ``unit``: force "GiB", "MiB", "KiB" or "B" (for columns that share a unit). ``None``
    prints as "-" (a figure that this device does not have).
    """
    if n is None:
        return "-"
    sizes = dict(UNITS)
    if unit is not None:
        if unit == "B":
            return f"{int(n)} B"
        return f"{n / sizes[unit]:.1f} {unit}"
    for name, size in UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {name}"
    return f"{int(n)} B"


def shard_size(total: int, parts: int, index: int) -> int:
    """Size of piece ``index`` when ``total`` is cut into ``parts`` as ``torch.chunk`` cuts it.

    Pieces are ``ceil(total / parts)`` long and the last ones shorter (or empty): the
    placement DTensor's ``Shard`` uses, so a shard here is the shard a DTensor would hold.

    >>> [shard_size(259, 2, i) for i in range(2)]
    [130, 129]
    """
    chunk = -(-total // parts)
    return max(0, min(chunk, total - index * chunk))


def shard_range(total: int, parts: int, index: int) -> range:
    """The indices of piece ``index`` of ``total`` (see :func:`shard_size`)."""
    chunk = -(-total // parts)
    start = min(total, index * chunk)
    return range(start, start + shard_size(total, parts, index))


def split_evenly(total: int, parts: int) -> list[range]:
    """``total`` items cut into ``parts`` contiguous ranges, as even as possible, the earlier
    ranges taking the remainder, so that concatenating them in order gives the items back.

    Used for prompts over replicas and micro-batches, and layers over pipeline stages.

    >>> split_evenly(5, 2)
    [range(0, 3), range(3, 5)]
    """
    base, extra = divmod(total, parts)
    out, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
