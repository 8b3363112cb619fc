"""Data parallelism: every replica holds the whole model and takes a slice of the prompts.

The plan is the slicing: contiguous chunks of the batch, as even as possible, earlier
replicas taking the remainder, so that gathering the replicas' outputs in replica order
gives the prompts back in their order. Replicas never talk to each other.
"""

from __future__ import annotations


def split_batch(rows: int, parts: int) -> list[range]:
    """``rows`` items cut into ``parts`` contiguous ranges.

    >>> split_batch(5, 2)
    [range(0, 3), range(3, 5)]
    """
    base, extra = divmod(rows, parts)
    out, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out
