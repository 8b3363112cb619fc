"""Vocab-parallel logits: what to do with an LM head split over the vocabulary.

Under tensor parallel the LM head is ``colwise`` over the vocabulary (Megatron's and
torchtitan's vocab-parallel head): rank r of the tp group holds rows [start, stop) of the
head, ``torch.chunk``-cut like every shard (259 tokens over 2 ranks: 130 + 129), and computes
only those logits. The family's own post-processing (Gemma 2's final softcapping, Granite's
logit scaling) is elementwise, so it runs on each rank's slice unchanged.

Two ways on from there:

- :func:`greedy_tokens`: the greedy token without gathering the vocabulary. Each rank's
  (max value, global index) pair is all-gathered, a few bytes per row, and the best pair wins;
  ties go to the smallest index, as with ``torch.argmax``.
- :func:`gather_logits`: the full logits on the group's first rank (a forward pass that
  returns logits, or sampling, which reads the whole distribution, on the rank that chooses):
  one gather. :func:`all_gather_logits` puts them on every rank.

``vocab`` is a :class:`mpbook.engine.runner.VocabShard` (start, stop, total, group), with
``group`` a :class:`mpbook.parallel.collectives.Group` over the tp ranks of the last stage.
These helpers do not count their collective: the caller does (the decode loop names it).
"""

from __future__ import annotations

from .tensor import shard_sizes


def gather_logits(local, vocab):
    """(..., stop - start) logits of this rank's slice -> (..., total) on the group's first rank,
    None on the others."""
    return vocab.group.gather_last_dim(local, shard_sizes(vocab.total, vocab.group.size))


def all_gather_logits(local, vocab):
    """(..., stop - start) logits of this rank's slice -> (..., total) on every rank of the group."""
    return vocab.group.all_gather_last_dim(local, shard_sizes(vocab.total, vocab.group.size))


def greedy_tokens(local, vocab):
    """argmax over the whole vocabulary of logits split over the group: (...) int64 global token
    ids, the same on every rank. ``local``: (..., stop - start), columns ``vocab.start`` onwards."""
    import torch

    if local.shape[-1]:
        value, index = local.max(dim=-1)  # the first maximum within the slice
    else:  # a rank with an empty slice (vocabulary smaller than the group) still takes part
        value = local.new_full(local.shape[:-1], float("-inf"))
        index = torch.zeros(local.shape[:-1], dtype=torch.long, device=local.device)
    # float64 carries both exactly: float32 / bf16 logits, and indices up to 2**53.
    pair = torch.stack([value.double(), (index + vocab.start).double()])
    pairs = vocab.group.all_gather_stack(pair)  # (size, 2, ...)
    values, indices = pairs[:, 0], pairs[:, 1]
    best = values.max(dim=0).values
    indices = indices.masked_fill(values != best, float("inf"))
    return indices.min(dim=0).values.long()
