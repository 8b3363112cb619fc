"""What a run's forward passes keep alive at once on one rank: an estimate, term by term.

The formula is spelled out in :func:`mpbook.plan`'s docstring; each term here carries the
reason it is there. Ops' internal workspaces and allocator rounding are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import shard_size
from .model_tensors import ModelDims
from .workload import Workload

LOGITS_BYTES = 4  # logits are counted in float32, the precision sampling reads them in


@dataclass(frozen=True, kw_only=True)
class Activations:
    """The larger phase's live set: its name ("prefill", "decode" or "idle") and its parts."""

    phase: str
    parts: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


IDLE = Activations(phase="idle", parts={})  # a replica without prompts runs nothing


def activations(dims: ModelDims, work: Workload, *, rows: int, microbatch_rows: int, cached: tuple[int, ...],
                element_size: int, tp: int, tp_rank: int, last: bool, pp: int,
                heads_tp: int | None = None, vocab_tp: int = 1) -> Activations:
    """The larger of the prefill and the largest decode step of one micro-batch on this rank.

    ``heads_tp``: what the heads are split by (``tp``, or 1 where the plan gathers attention);
    ``vocab_tp``: what the LM head's vocabulary is split by (tp under tensor parallel)."""
    mb, e = microbatch_rows, element_size
    h, hd = dims.hidden, dims.head_dim
    heads_tp = tp if heads_tp is None else heads_tp
    head_rank = tp_rank if heads_tp > 1 else 0
    heads, kvh = shard_size(dims.heads, heads_tp, head_rank), shard_size(dims.kv_heads, heads_tp, head_rank)
    inter = shard_size(dims.intermediate, tp, tp_rank)
    eager = work.attention == "eager"
    generate = work.max_new_tokens > 0
    phases = {}
    steps = [("prefill", work.prompt_len, work.prompt_len)]
    if generate:
        steps.append(("decode", 1, max(cached) if cached else work.tokens))
    for phase, q, k in steps:
        parts = {
            # the stage input (kept by the model's forward), the residual, and its normed copy
            "hidden states": 3 * mb * q * h * e,
            "mask": mb * q * k * (e if eager else 1),  # 4-D: additive floats (eager) or booleans
            "rotary cos/sin": 2 * mb * q * hd * e,
        }
        query = mb * q * heads * hd * e
        # Grouped-query attention: eager repeats k and v to every query head; sdpa does so
        # only for a masked prefill (a decode step folds the groups into the query instead).
        repeats = heads != kvh and (eager or q > 1)
        repeated = 2 * mb * heads * k * hd * e if repeats else 0
        # Eager scores: their float32 softmax, and (below float32) its cast back, while the
        # scores themselves are still referenced.
        scores = mb * heads * q * k * (e + 4 + (e if e != 4 else 0)) if eager else 0
        attention = query + repeated + max(scores, 2 * query)  # or: the output and its contiguous copy
        if phase == "decode":
            # torch.cat grows a layer's cache: the old k (then v) still exists beside the new one
            attention = max(attention, mb * kvh * k * hd * e)
        mlp = 3 * mb * q * inter * e  # act(gate), up, and their product
        if attention >= mlp:
            parts["attention (q, repeated k/v, scores)" if eager else "attention (q, repeated k/v, output)"] = attention
        else:
            parts["MLP (3 x rows x tokens x intermediate/tp)"] = mlp
        if last:
            # The LM head: generation keeps the last position of a micro-batch; a forward
            # pass returns every position of every row of the replica.
            local = shard_size(dims.vocab, vocab_tp, 0)  # this rank's slice of a vocab-parallel head (the largest)
            logits = mb * 1 * local * LOGITS_BYTES if generate else rows * q * local * LOGITS_BYTES
            if not generate and vocab_tp > 1 and tp_rank == 0:
                # a forward pass gathers the slices onto the tp group's first rank: the slices
                # received and their concatenation, which the result keeps
                logits += 2 * rows * q * dims.vocab * LOGITS_BYTES
            head = 2 * mb * q * h * e + logits
            if head > sum(parts.values()):
                parts = {"hidden states": 2 * mb * q * h * e, "logits": logits}
        elif pp > 1 and rows > mb:
            # isend keeps each earlier micro-batch's output alive until the step's flush
            parts["sends in flight"] = (rows - mb) * q * h * e
        phases[phase] = parts
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return Activations(phase=phase, parts=phases[phase])
