"""Data parallelism: every replica holds the whole model and takes a slice of the prompts.

The plan is the slicing: contiguous chunks of the batch, as even as possible, earlier
replicas taking the remainder (:func:`mpbook.units.split_evenly`), so that gathering the
replicas' outputs in replica order gives the prompts back in their order. Replicas never
talk to each other.
"""

from __future__ import annotations

from ..units import split_evenly


def replica_rows(prompts: int, dp: int, replica: int) -> range:
    """The prompts replica ``replica`` of ``dp`` serves."""
    return split_evenly(prompts, dp)[replica]
