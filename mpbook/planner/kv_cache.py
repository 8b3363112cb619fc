"""What a run's KV cache takes on one rank: exact for transformers' DynamicCache.

The cache's layer kinds come from transformers' own cache layer types for the config
(full attention, sliding window, none), so a sliding-window model is counted as it caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..units import shard_size
from .model_tensors import ModelDims
from .workload import Workload


@dataclass(frozen=True, kw_only=True)
class KVCache:
    """One rank's cache at the end of generation, and how its bytes are made."""

    bytes: int
    formula: str  # "2 (k, v) x rows x ... = " without the result
    tokens_per_layer: tuple[int, ...]  # the largest key length of each of the stage's layers


@dataclass(frozen=True)
class CacheLayer:
    """How one decoder layer caches: not at all (``dummy``), or every token, or a window."""

    caches: bool
    window: int | None

    def tokens(self, work: Workload) -> int:
        """Tokens the layer's cache holds at its largest, as transformers' DynamicCache keeps them.

        A sliding-window layer keeps the last ``window - 1`` tokens as a view of the step's
        full tensor, so after the prefill its storage is the whole prompt, and after a decode
        step at most ``window`` tokens.
        """
        if not self.caches:
            return 0
        if self.window:
            return min(work.tokens, max(work.prompt_len, self.window))
        return work.tokens


def cache_layers(config) -> tuple[CacheLayer, ...]:
    """Each decoder layer's cache kind, from transformers' own cache layer types for the config.

    Read once per layout: it walks the config, which is slow next to the arithmetic."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return tuple(CacheLayer(caches=kind != "dummy", window=kw.get("sliding_window")) for kind, kw in zip(types, kwargs))


def kv_cache(cached: Sequence[CacheLayer], dims: ModelDims, work: Workload, *, layers: range, rows: int,
             element_size: int, tp: int, tp_rank: int) -> KVCache:
    """Keys and values of ``layers`` for ``rows`` prompts, this tp rank's KV heads only."""
    kv_heads = shard_size(dims.kv_heads, tp, tp_rank)  # k/v projections are column-split by heads
    tokens = [cached[i].tokens(work) for i in layers]
    formula = (
        f"2 (k, v) x {rows} row{'s' if rows != 1 else ''} x {_tokens_text(tokens, work)} x "
        f"{kv_heads} KV head{'s' if kv_heads != 1 else ''} ({dims.kv_heads}/{tp}) x {dims.head_dim} head dim "
        f"x {element_size} B"
    )
    return KVCache(
        bytes=2 * rows * sum(tokens) * kv_heads * dims.head_dim * element_size,
        formula=formula,
        tokens_per_layer=tuple(tokens),
    )


def _tokens_text(cached: list[int], work: Workload) -> str:
    counts: dict[int, int] = {}
    for n in cached:
        counts[n] = counts.get(n, 0) + 1
    pieces = []
    for n, k in counts.items():
        what = f"{n} tokens"
        if n == work.tokens and work.max_new_tokens > 1:
            what = f"{n} tokens ({work.prompt_len} prompt + {work.max_new_tokens - 1} of the {work.max_new_tokens} new)"
        elif n != work.tokens:
            what = f"{n} tokens (sliding window)"
        pieces.append(f"{k} layer{'s' if k != 1 else ''} x {what}")
    return "(" + " + ".join(pieces) + ")" if len(pieces) > 1 else pieces[0]
