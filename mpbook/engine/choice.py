"""Token choice: greedy or sampled (transformers' semantics), and when a row stops.

Order, as ``GenerationMixin._get_logits_processor`` builds it (transformers 5.24): the
repetition penalty (greedy too), then, only when sampling, temperature, top-k and top-p
(transformers' own warpers, each only when it changes something); then argmax, or one draw.
Logits are upcast to float32 first, as generate() does.

The random stream belongs to the prompt, not to a rank or a batch row: prompt i has its own
CPU ``torch.Generator`` seeded from (seed, i); every step draws one float64 uniform per row
from it, and the token is the inverse CDF of the filtered distribution at that uniform,
summed in vocabulary order in float64 on the CPU. So a seed picks the same tokens however the
prompts are split into replicas or micro-batches and whatever device runs the model (up to
floating-point differences in the logits themselves). Choice happens on one rank per replica;
the token is then sent to the ranks that need it (the same seed on two GPUs does not give the
same random numbers, so ranks never sample separately).

A row finishes at an end-of-sequence id (unless ``ignore_eos``), when its text ends with a
stop string (transformers' StopStringCriteria, on ids), or at ``max_new_tokens``; later
tokens of a finished row are the pad id, as generate() fills finished rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..protocol import Sampling, Stopping

MASK64 = (1 << 64) - 1
REASONS = (None, "eos", "stop", "length")


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a bijective 64-bit mix, every input bit reaching every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt ``prompt_index``'s random stream under run seed ``seed``.

    Mixed, so that nearby (seed, index) pairs give unrelated streams, and folded to 32 bits:
    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed.
    """
    x = _splitmix64(_splitmix64(seed & MASK64) ^ (prompt_index & MASK64))
    return (x ^ (x >> 32)) & 0xFFFFFFFF


def penalize_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor's rule on the tokens a row has seen (its prompt without
    padding, and what it generated): a negative score is multiplied by the penalty, a positive
    one divided, once per token however often it occurred."""
    if penalty == 1.0:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def warpers(sampling: Sampling) -> list:
    """transformers' own warpers, in generate()'s order, each only when it changes something."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    steps = []
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            steps.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k:
            steps.append(TopKLogitsWarper(top_k=int(sampling.top_k)))
        if sampling.top_p < 1.0:
            steps.append(TopPLogitsWarper(top_p=float(sampling.top_p)))
    return steps


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row, the first token (in vocabulary order) whose cumulative probability exceeds
    ``uniform * total``; zero-probability (filtered) tokens are never chosen. float64 on the
    CPU: the same sums on any device."""
    cdf = probs.detach().to("cpu", torch.float64).cumsum(-1)
    totals = cdf[:, -1:].contiguous()
    tokens = torch.searchsorted(cdf, uniforms.to(torch.float64)[:, None] * totals, right=True)
    last = torch.searchsorted(cdf, totals)  # guards u * total rounding up to the total
    return torch.minimum(tokens, last)[:, 0]


class TokenChooser:
    """Chooses the next token of each row of one micro-batch, step by step.

    ``prompt_indices``: each row's index in the whole request (it names the row's random
    stream). ``prompt_ids``/``attention_mask``: the left-padded prompts, for the repetition
    penalty (padding is not "seen"). ``vocab_size``: the full logits' width.
    """

    def __init__(self, sampling: Sampling, *, prompt_indices: Sequence[int], prompt_ids: torch.Tensor,
                 attention_mask: torch.Tensor, vocab_size: int):
        self.sampling = sampling
        self.warpers = warpers(sampling)
        seed = sampling.seed or 0
        self.generators = [torch.Generator().manual_seed(prompt_seed(seed, int(i))) for i in prompt_indices]
        self.seen = None
        if sampling.repetition_penalty != 1.0:
            # One bool per (row, vocabulary entry): what the penalty needs, however long the text.
            seen = torch.zeros(prompt_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=prompt_ids.device)
            ids = prompt_ids.masked_fill(attention_mask == 0, vocab_size).clamp(max=vocab_size)
            seen.scatter_(1, ids, True)
            self.seen = seen[:, :vocab_size].contiguous()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed scores (generate's ``output_scores``) of the last position's logits."""
        scores = logits.float()
        if self.seen is not None:
            scores = penalize_repeats(scores, self.seen, self.sampling.repetition_penalty)
        for warp in self.warpers:
            scores = warp(None, scores)  # the warpers ignore input_ids
        return scores

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row, on the logits' device. ``logits``: (rows, vocab)."""
        scores = self.scores(logits)
        if not self.sampling.do_sample:
            return scores.argmax(-1)  # the first of equal maxima
        # One draw per row per step, finished or not: a prompt's stream advances exactly
        # once per step of its own generation.
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        return inverse_cdf(torch.softmax(scores, dim=-1), uniforms).to(logits.device)

    def update(self, tokens: torch.Tensor) -> None:
        """Record the tokens the rows now hold (finished rows padded)."""
        if self.seen is not None:
            rows = torch.arange(len(tokens), device=tokens.device)
            fits = tokens < self.seen.shape[1]
            self.seen[rows[fits], tokens[fits]] = True


def stop_string_criteria(tokenizer, stop_strings: Sequence[str]):
    """transformers' StopStringCriteria for ``stop_strings``, or None. Built once from the
    tokenizer (it walks the vocabulary); afterwards it needs only ids."""
    if not stop_strings:
        return None
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings))


class Stopper:
    """Which rows of one micro-batch have finished, and why.

    A stop string may begin in the prompt, as in generate(), which matches on prompt and
    generated ids together: a window of each row's last ids is kept, seeded from the prompt.
    """

    def __init__(self, stopping: Stopping, *, pad_id: int, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                 criteria: Any = None):
        device = prompt_ids.device
        self.pad_id = pad_id
        self.eos = torch.tensor([] if stopping.ignore_eos else list(stopping.eos_token_ids), dtype=torch.long,
                                device=device)
        self.max_new_tokens = stopping.max_new_tokens
        self.steps = 0
        rows = prompt_ids.shape[0]
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens up to the finishing one
        self.reason_codes = torch.zeros(rows, dtype=torch.long, device=device)  # index into REASONS
        self.criteria = criteria
        self.window = None
        if criteria is not None:
            # Left padding becomes an id the criteria's table maps to "matches nothing" (its
            # last row), so a pad's text never counts as part of a match.
            no_match = criteria.embedding_vec.shape[0] - 1
            ids = prompt_ids.masked_fill(attention_mask == 0, no_match)
            width = criteria.maximum_token_len
            if ids.shape[1] < width:
                ids = torch.nn.functional.pad(ids, (width - ids.shape[1], 0), value=no_match)
            self.window = ids[:, -width:].cpu()

    @property
    def reasons(self) -> list[str | None]:
        """Why each row finished: "eos", "stop" or "length" (vLLM's finish reasons), or None."""
        return [REASONS[c] for c in self.reason_codes.tolist()]

    @property
    def all_finished(self) -> bool:
        return bool(self.finished.all())

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Take this step's chosen tokens; return them with finished rows padded, and mark the
        rows that finish with them."""
        # As few tensor operations as the run's stop rules need: each is several microseconds
        # after a forward pass, and a step waits for them.
        tokens = tokens.masked_fill(self.finished, self.pad_id)
        active = ~self.finished
        self.steps += 1
        self.lengths += active
        # Each finishing row's reason code, 0 for the others: the length, overridden by a
        # stop string, overridden by an end-of-sequence id (generate()'s precedence).
        codes = None
        if self.steps >= self.max_new_tokens:
            codes = active.long() * 3
        if self.criteria is not None:
            self.window = torch.cat([self.window[:, 1:], tokens[:, None].cpu()], dim=1)
            by_stop = self.criteria(self.window, None).to(active.device) & active
            codes = by_stop.long() * 2 if codes is None else torch.where(by_stop, 2, codes)
        if len(self.eos):
            by_eos = torch.isin(tokens, self.eos) & active
            codes = by_eos.long() if codes is None else torch.where(by_eos, 1, codes)
        if codes is not None:
            self.reason_codes += codes  # 0 until a row finishes, and finished rows get 0 here
            self.finished |= codes > 0
        return tokens
