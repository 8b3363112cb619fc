"""Pipeline parallelism: contiguous decoder layers per stage, micro-batches flow through.

The split is data: a list of ``range`` objects, one per stage, over the decoder layers.
The first stage also holds the token embedding, the last the final norm and the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MpbookError


def split_layers(num_layers: int, pp: int, sizes: Sequence[int] | None = None) -> list[range]:
    """Layers per stage: balanced (earlier stages take the remainder) or as ``sizes`` says.

    >>> split_layers(6, 4)
    [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    """
    if pp > num_layers:
        raise MpbookError(
            f"pp={pp}: the model has {num_layers} decoder layers, so at most {num_layers} stages; "
            f"choose pp in 1..{num_layers}"
        )
    if sizes is None:
        base, extra = divmod(num_layers, pp)
        sizes = [base + (1 if s < extra else 0) for s in range(pp)]
    else:
        sizes = list(sizes)
        if len(sizes) != pp or any(s < 1 for s in sizes) or sum(sizes) != num_layers:
            raise MpbookError(
                f"stage sizes {sizes}: need {pp} sizes of at least 1 layer that add up to the "
                f"{num_layers} layers (they add up to {sum(sizes)})"
            )
    stages, start = [], 0
    for size in sizes:
        stages.append(range(start, start + size))
        start += size
    return stages
