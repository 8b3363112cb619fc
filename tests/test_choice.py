"""Token choice and stopping (mpbook.engine.choice) against transformers' own pieces; the
sampling options (mpbook.options.choose_sampling) and the latency figures of a result.

Pure: no engines. A tiny random Llama (2 layers, width 64) is built in this process for the
end-to-end comparisons with ``generate()``; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mpbook.engine.choice import REASONS, Stopper, TokenChooser, inverse_cdf, prompt_seed, stop_string_criteria
from mpbook.errors import MpbookError
from mpbook.models.tokenizer import EOS_ID, IM_END_ID, PAD_ID, TOKENIZER_IDS, tiny_word_tokenizer
from mpbook.protocol import Sampling, Stopping
from mpbook.options import choose_sampling
from mpbook.session.prompts import encode_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_word_tokenizer()


@pytest.fixture(scope="module")
def model():
    """2 layers, width 64, the presets' vocabulary; weights drawn wide (as mpbook's presets) so
    that greedy decoding wanders over the vocabulary instead of repeating one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **TOKENIZER_IDS)
    lm = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    return lm.eval()


PROMPTS = [
    "the cat sat on the mat",
    "hello",
    "what is a tensor? explain the pipeline in one sentence.",
    "system memory",
]


# --------------------------------------------------------------------------- distributions
OPTIONS = [
    Sampling(do_sample=True, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3),
    Sampling(do_sample=True, temperature=1.5, top_p=0.5),
    Sampling(do_sample=True, top_k=3, repetition_penalty=0.8),
    Sampling(do_sample=True, top_k=1000),  # more than the vocabulary: keeps everything
    Sampling(do_sample=True, top_p=0.0),  # only the top token (min_tokens_to_keep=1)
    Sampling(do_sample=True, temperature=0.3, top_k=2, top_p=0.99),
    Sampling(repetition_penalty=1.2),  # greedy: only the penalty applies
    Sampling(temperature=0.5, top_k=3, top_p=0.5),  # greedy: the warpers are not applied
]


def their_processors(sampling: Sampling, attention_mask: torch.Tensor) -> LogitsProcessorList:
    """What GenerationMixin._get_logits_processor builds for these options, in its order."""
    out = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        padding_lengths = (attention_mask != 0).int().argmax(dim=1)  # as generate() computes them
        out.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty),
                                                    prompt_ignore_length=padding_lengths))
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k != 0:
            out.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    return out


def random_logits(rows: int, vocab: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "ties":
        return torch.randint(-3, 4, (rows, vocab), generator=g).float()  # many equal values
    logits = torch.randn(rows, vocab, generator=g) * 3
    if kind == "inf":
        logits[torch.rand(rows, vocab, generator=g) < 0.3] = -float("inf")
        logits[:, 0] = 1.0  # every row finite somewhere
    return logits


def left_padded_history(rows: int, vocab: int, g: torch.Generator, length: int = 9):
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    pads = torch.randint(0, length, (rows,), generator=g)  # at least one real token per row
    mask = (torch.arange(length)[None, :] >= pads[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask  # padding (id 0) must not count as seen


@pytest.mark.parametrize("shape", [(1, 7), (3, 50), (5, 1000)])
@pytest.mark.parametrize("kind", ["normal", "inf", "ties"])
@pytest.mark.parametrize("sampling", OPTIONS, ids=range(len(OPTIONS)))
def test_scores_equal_transformers_processors(shape, kind, sampling):
    """Bit for bit, -inf where they filter, over several steps (the penalty's history grows)."""
    rows, vocab = shape
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids, mask = left_padded_history(rows, vocab, g)
        chooser = TokenChooser(sampling, prompt_indices=range(rows), prompt_ids=ids, attention_mask=mask,
                               vocab_size=vocab)
        theirs = their_processors(sampling, mask)
        for step in range(3):
            logits = random_logits(rows, vocab, kind, g)
            ours = chooser.scores(logits.clone())
            assert torch.equal(ours, theirs(ids, logits.clone())), (seed, step)
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs(ids, logits.clone())))
            tokens = torch.randint(0, vocab, (rows,), generator=g)
            chooser.update(tokens)
            ids = torch.cat([ids, tokens[:, None]], dim=1)


def test_scores_equal_generate_output_scores(model, tokenizer):
    """End to end: generate()'s own processed scores, step by step, from its raw logits."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=1)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3,
                         max_new_tokens=6, output_scores=True, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    chooser = TokenChooser(sampling, prompt_indices=range(len(PROMPTS)), prompt_ids=batch.input_ids,
                           attention_mask=batch.attention_mask, vocab_size=model.config.vocab_size)
    start = batch.input_ids.shape[1]
    assert len(out.scores) > 1
    for step, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        assert torch.equal(chooser.scores(logits), scores), step
        chooser.update(out.sequences[:, start + step])


def test_only_the_needed_warpers_are_built():
    assert TokenChooser(Sampling(), prompt_indices=[0], prompt_ids=torch.ones(1, 2, dtype=torch.long),
                        attention_mask=torch.ones(1, 2, dtype=torch.long), vocab_size=4).warpers == []
    kinds = [type(w).__name__ for w in TokenChooser(
        Sampling(do_sample=True, temperature=2.0, top_k=3, top_p=0.5), prompt_indices=[0],
        prompt_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
        vocab_size=4).warpers]
    assert kinds == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]


# --------------------------------------------------------------------------- greedy
def chooser_for(sampling: Sampling, rows: int, vocab: int, *, indices=None) -> TokenChooser:
    ids = torch.full((rows, 1), 1, dtype=torch.long)
    return TokenChooser(sampling, prompt_indices=list(range(rows)) if indices is None else indices, prompt_ids=ids,
                        attention_mask=torch.ones_like(ids), vocab_size=vocab)


def test_greedy_is_argmax_first_of_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-float("inf"), -3.0, -float("inf"), -3.0]])
    assert chooser_for(Sampling(), 3, 4).choose(logits).tolist() == [1, 0, 1]
    for kind in ("normal", "inf", "ties"):
        g = torch.Generator().manual_seed(7)
        many = random_logits(16, 300, kind, g)
        assert torch.equal(chooser_for(Sampling(), 16, 300).choose(many), many.argmax(-1))
        # greedy ignores the seed and the warpers' options, and draws nothing
        assert torch.equal(chooser_for(Sampling(seed=3, temperature=0.1, top_k=2), 16, 300).choose(many),
                           many.argmax(-1))


def test_greedy_draws_no_random_numbers():
    chooser = chooser_for(Sampling(seed=1), 2, 5)
    before = [g.get_state().clone() for g in chooser.generators]
    chooser.choose(torch.randn(2, 5))
    assert all(torch.equal(a, g.get_state()) for a, g in zip(before, chooser.generators))


def test_sampling_draws_one_uniform_per_row_per_step():
    sampling = Sampling(do_sample=True, seed=11)
    chooser = chooser_for(sampling, 3, 5)
    chooser.choose(torch.randn(3, 5))
    chooser.choose(torch.randn(3, 5))
    for i, g in enumerate(chooser.generators):
        fresh = torch.Generator().manual_seed(prompt_seed(11, i))
        torch.rand(2, generator=fresh, dtype=torch.float64)
        assert torch.equal(fresh.get_state(), g.get_state())


# --------------------------------------------------------------------------- the draw
def test_inverse_cdf_cut_points():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.05, 0.1, 0.7 - 1e-12, 0.999999], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3]  # token 1 (p=0) is never chosen
    # the largest uniform below 1: the last token with p > 0, never a trailing p=0 one
    tail = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float32)
    assert inverse_cdf(tail, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_inverse_cdf_frequencies():
    probs = torch.tensor([0.05, 0.0, 0.5, 0.25, 0.2])
    g = torch.Generator().manual_seed(1)
    n = 40000
    tokens = inverse_cdf(probs.expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs.double(), atol=0.01)


def test_sampling_never_picks_a_filtered_token():
    g = torch.Generator().manual_seed(5)
    sampling = Sampling(do_sample=True, temperature=0.9, top_k=4, top_p=0.7, seed=2)
    chooser = chooser_for(sampling, 8, 60)
    for _ in range(50):
        logits = random_logits(8, 60, "inf", g)
        allowed = torch.isfinite(chooser.scores(logits))
        tokens = chooser.choose(logits)
        assert allowed[torch.arange(8), tokens].all()


# --------------------------------------------------------------------------- one stream per prompt
def prompt_seed_cases():
    return [(s, i) for s in (0, 1, 2, 2**32, 2**32 + 1, 2**63 - 1) for i in range(64)]


def test_prompt_seed_folds_to_32_bits_and_mixes():
    seeds = [prompt_seed(s, i) for s, i in prompt_seed_cases()]
    assert all(isinstance(x, int) and 0 <= x < 2**32 for x in seeds)
    assert len(set(seeds)) == len(seeds)  # no two (seed, index) pairs share a stream here
    assert prompt_seed(1, 0) != prompt_seed(0, 1)
    assert prompt_seed(3, 5) == prompt_seed(3, 5)
    # seeds differing only above bit 31 still get different streams (folded, not truncated)
    assert prompt_seed(1, 0) != prompt_seed(1 + 2**32, 0)
    # why the fold: torch's CPU generator keeps only the low 32 bits of its seed
    a = torch.rand(2, generator=torch.Generator().manual_seed(1))
    b = torch.rand(2, generator=torch.Generator().manual_seed(1 + 2**32))
    assert torch.equal(a, b)


class ToyModel:
    """Next-token logits of a row from its own history only (the last token and how many it
    has), like a language model: the same prompt gives the same logits in any batch."""

    def __init__(self, vocab: int = 40):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g) * 2
        self.vocab = vocab

    def logits(self, last: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return self.table[last] + 0.1 * length[:, None].float().sin()


def toy_generate(toy: ToyModel, prompts: list[list[int]], indices: list[int], sampling: Sampling, *,
                 eos=(), max_new_tokens: int = 12, pad_id: int = 0) -> list[list[int]]:
    """A batch of (left-padded) prompts through choose/stop until every row finished."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    chooser = TokenChooser(sampling, prompt_indices=indices, prompt_ids=ids, attention_mask=mask, vocab_size=toy.vocab)
    stopper = Stopper(Stopping(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos)), pad_id=pad_id,
                      prompt_ids=ids, attention_mask=mask)
    last, length, steps = ids[:, -1], mask.sum(1), []
    while not stopper.all_finished:
        tokens = stopper.update(chooser.choose(toy.logits(last, length)))
        chooser.update(tokens)
        steps.append(tokens)
        last, length = tokens, length + 1
    columns = torch.stack(steps, dim=1).tolist()
    return [row[:n] for row, n in zip(columns, stopper.lengths.tolist())]


TOY_PROMPTS = [[3, 4, 5], [7], [9, 9, 2, 11], [4, 5], [13, 1, 17], [21]]
SAMPLED = Sampling(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=1234)


def split_run(sampling: Sampling, sizes: list[int], *, eos=(7, 8)) -> list[list[int]]:
    """The prompts cut into consecutive batches of ``sizes``; prompt indices name the streams."""
    toy, rows, start = ToyModel(), [], 0
    for size in sizes:
        part = list(range(start, start + size))
        rows += toy_generate(toy, [TOY_PROMPTS[i] for i in part], part, sampling, eos=eos)
        start += size
    return rows


def test_same_seed_same_tokens_whatever_the_batch_split():
    whole = split_run(SAMPLED, [6])
    assert any(len(r) < 12 for r in whole) and any(len(r) > 1 for r in whole)  # some rows end early
    for sizes in ([3, 3], [2, 2, 2], [5, 1], [1] * 6, [4, 2]):
        assert split_run(SAMPLED, sizes) == whole, sizes


def test_another_seed_differs_and_the_global_rng_plays_no_part():
    torch.manual_seed(0)
    a = split_run(SAMPLED, [6], eos=())
    torch.manual_seed(99)
    assert split_run(SAMPLED, [6], eos=()) == a
    import dataclasses

    b = split_run(dataclasses.replace(SAMPLED, seed=1235), [6], eos=())
    assert sum(x != y for x, y in zip(a, b)) >= 5


def test_the_same_prompt_at_two_indices_gets_two_streams():
    toy = ToyModel()
    rows = toy_generate(toy, [[3, 4], [3, 4]], [0, 1], SAMPLED)
    assert rows[0] != rows[1]
    # and a prompt's tokens depend on its index, not on its row in the batch
    assert toy_generate(toy, [[3, 4], [3, 4]], [1, 0], SAMPLED) == [rows[1], rows[0]]


# --------------------------------------------------------------------------- stopping
def stopper(rows: int = 3, **stopping) -> Stopper:
    ids = torch.ones(rows, 4, dtype=torch.long)
    options = {"max_new_tokens": 4, "eos_token_ids": (EOS_ID, IM_END_ID), **stopping}
    return Stopper(Stopping(**options), pad_id=PAD_ID, prompt_ids=ids, attention_mask=torch.ones_like(ids))


def test_rows_finish_on_any_eos_id_and_are_padded_after():
    s = stopper()
    assert s.reasons == [None, None, None] and not s.all_finished
    assert s.update(torch.tensor([2, 7, 7])).tolist() == [2, 7, 7]  # the finishing token is kept
    assert s.finished.tolist() == [True, False, False] and not s.all_finished
    assert s.update(torch.tensor([9, 5, 7])).tolist() == [PAD_ID, 5, 7]  # finished row 0 gets the pad
    assert s.update(torch.tensor([2, 9, 2])).tolist() == [PAD_ID, PAD_ID, 2]  # even an eos is padded
    assert s.all_finished
    assert s.lengths.tolist() == [1, 2, 3]
    assert s.reasons == ["eos", "eos", "eos"]


def test_max_new_tokens_caps_and_ignore_eos():
    s = stopper(ignore_eos=True, max_new_tokens=3)
    for _ in range(3):
        assert not s.all_finished
        assert s.update(torch.tensor([2, 5, 7])).tolist() == [2, 5, 7]  # eos ids are ordinary tokens now
    assert s.all_finished and s.reasons == ["length"] * 3 and s.lengths.tolist() == [3, 3, 3]
    s = stopper(max_new_tokens=2)
    s.update(torch.tensor([7, 2, 7]))
    s.update(torch.tensor([2, 9, 9]))  # eos at the cap's step: the reason is eos
    assert s.reasons == ["eos", "eos", "length"] and s.lengths.tolist() == [2, 1, 2]


def test_no_eos_ids_only_the_cap():
    s = stopper(eos_token_ids=(), max_new_tokens=2)
    s.update(torch.tensor([2, 5, 0]))
    assert not s.finished.any()
    s.update(torch.tensor([2, 5, 0]))
    assert s.reasons == ["length"] * 3


def test_reasons_are_vllms_finish_reasons():
    assert REASONS == (None, "eos", "stop", "length")


def test_stop_strings_like_transformers(tokenizer):
    """Rows end when their text (prompt included) ends with a stop string, as transformers'
    StopStringCriteria sees the same ids; the stop string's token is kept, then padding."""
    stops = ["model data", "at", "tensor"]
    criteria = stop_string_criteria(tokenizer, stops)
    assert isinstance(criteria, StopStringCriteria)
    theirs = StopStringCriteria(tokenizer=tokenizer, stop_strings=stops)
    batch = tokenizer(["the model", "a long prompt about a", "the", "hello"], padding=True, return_tensors="pt")
    s = Stopper(Stopping(max_new_tokens=5, eos_token_ids=(EOS_ID,), stop_strings=tuple(stops)), pad_id=PAD_ID,
                prompt_ids=batch.input_ids, attention_mask=batch.attention_mask, criteria=criteria)
    ids = batch.input_ids
    steps = [["data", "what", "model", "memory"], ["yes", "word", "tensor", "</s>"], ["more", "more", "more", "more"]]
    expected_finished = [[True, True, False, False], [True, True, True, True], [True, True, True, True]]
    for words, finished in zip(steps, expected_finished):
        tokens = torch.tensor(tokenizer.convert_tokens_to_ids(words))
        before = s.finished.clone()
        out = s.update(tokens)
        assert out.tolist() == torch.where(before, PAD_ID, tokens).tolist()
        ids = torch.cat([ids, out[:, None]], dim=1)
        # what transformers says on the same ids, for the rows that were still going
        said = theirs(ids, None)
        assert s.finished.tolist() == finished
        assert (said[~before] | torch.isin(out[~before], torch.tensor([EOS_ID]))).tolist() == \
            s.finished[~before].tolist()
    # "model data" began in the prompt; "at" matched inside "what" (text, not whole tokens)
    assert s.reasons == ["stop", "stop", "stop", "eos"]
    assert s.lengths.tolist() == [1, 1, 2, 2]


def test_stop_string_padding_never_matches(tokenizer):
    """Left padding becomes the criteria's "matches nothing" id, even for a stop string made
    of the pad token's own text."""
    criteria = stop_string_criteria(tokenizer, ["<pad>hello"])
    batch = tokenizer(["hello", "the model data"], padding=True, return_tensors="pt")
    s = Stopper(Stopping(max_new_tokens=3, stop_strings=("<pad>hello",)), pad_id=PAD_ID,
                prompt_ids=batch.input_ids, attention_mask=batch.attention_mask, criteria=criteria)
    s.update(torch.tensor(tokenizer.convert_tokens_to_ids(["hello", "hello"])))
    assert not s.finished.any()


def test_no_stop_strings_no_criteria(tokenizer):
    assert stop_string_criteria(tokenizer, ()) is None
    assert stop_string_criteria(tokenizer, None) is None


def test_ignore_eos_still_stops_at_a_stop_string(tokenizer):
    criteria = stop_string_criteria(tokenizer, ["memory"])
    batch = tokenizer(["hello", "the"], padding=True, return_tensors="pt")
    s = Stopper(Stopping(max_new_tokens=4, eos_token_ids=(EOS_ID,), stop_strings=("memory",), ignore_eos=True),
                pad_id=PAD_ID, prompt_ids=batch.input_ids, attention_mask=batch.attention_mask, criteria=criteria)
    s.update(torch.tensor([EOS_ID, tokenizer.convert_tokens_to_ids("memory")]))
    assert s.reasons == [None, "stop"]


def test_one_step_that_meets_several_stop_rules_names_generates_first(tokenizer):
    """eos before a stop string before the cap, as generate() ranks them, when one token meets
    more than one; a row already finished keeps its reason and its length."""
    criteria = stop_string_criteria(tokenizer, ["memory"])
    batch = tokenizer(["hello", "the", "a", "model"], padding=True, return_tensors="pt")
    s = Stopper(Stopping(max_new_tokens=2, eos_token_ids=(EOS_ID,), stop_strings=("memory",)), pad_id=PAD_ID,
                prompt_ids=batch.input_ids, attention_mask=batch.attention_mask, criteria=criteria)
    memory = tokenizer.convert_tokens_to_ids("memory")
    s.update(torch.tensor([memory, 7, 7, 7]))  # row 0: a stop string before the cap
    assert s.reasons == ["stop", None, None, None]
    # the cap's step: row 1 eos, row 2 a stop string, row 3 nothing but the cap
    assert s.update(torch.tensor([EOS_ID, EOS_ID, memory, 7])).tolist() == [PAD_ID, EOS_ID, memory, 7]
    assert s.reasons == ["stop", "eos", "stop", "length"]
    assert s.lengths.tolist() == [1, 2, 2, 2] and s.all_finished


# --------------------------------------------------------------------------- a whole loop vs generate()
@torch.inference_mode()
def loop(model, batch, sampling: Sampling, stopping: Stopping, criteria=None) -> list[list[int]]:
    """A single-device prefill/decode loop with mpbook's chooser and stopper (padded rows)."""
    from transformers import DynamicCache

    ids, mask = batch.input_ids, batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    chooser = TokenChooser(sampling, prompt_indices=range(len(ids)), prompt_ids=ids, attention_mask=mask,
                           vocab_size=model.config.vocab_size)
    stop = Stopper(stopping, pad_id=PAD_ID, prompt_ids=ids, attention_mask=mask, criteria=criteria)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
    steps, position = [], positions[:, -1:]
    while True:
        tokens = stop.update(chooser.choose(logits))
        chooser.update(tokens)
        steps.append(tokens)
        if stop.all_finished:
            break
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                       cache=cache).logits[:, -1]
    return torch.stack(steps, dim=1).tolist()


def test_greedy_with_penalty_matches_generate(model, tokenizer):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    theirs = model.generate(**batch, do_sample=False, repetition_penalty=1.3, max_new_tokens=12, pad_token_id=PAD_ID,
                            eos_token_id=EOS_ID)
    ours = loop(model, batch, Sampling(repetition_penalty=1.3), Stopping(max_new_tokens=12, eos_token_ids=(EOS_ID,)))
    assert ours == theirs[:, batch.input_ids.shape[1]:].tolist()


def test_all_rows_stop_early_like_generate(model, tokenizer):
    """Rows that end early (stop strings, and an end-of-sequence id the model produces): the
    same tokens, the same padding and the same number of steps as generate(stop_strings=...)."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    start, limit = batch.input_ids.shape[1], 20
    free = model.generate(**batch, do_sample=False, max_new_tokens=limit, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    free = free[:, start:].tolist()

    def word(t):
        return tokenizer.convert_ids_to_tokens(t).isalpha()  # not a ## piece, punctuation or special

    stops = []  # what rows 0-2 say from step 2 on: a word, a two-word phrase, a word
    for r, row in enumerate(free[:3]):
        size = 2 if r == 1 else 1
        i = next(i for i in range(2, limit - size) if all(word(t) for t in row[i:i + size]))
        stops.append(tokenizer.decode(row[i:i + size]))
    eos = (EOS_ID, free[3][3])  # row 3 ends on an id it produces at step 3
    theirs = model.generate(**batch, do_sample=False, max_new_tokens=limit, pad_token_id=PAD_ID, eos_token_id=list(eos),
                            stop_strings=stops, tokenizer=tokenizer)
    theirs = theirs[:, start:].tolist()
    assert len(theirs[0]) < limit  # generate stopped early: every row finished
    ours = loop(model, batch, Sampling(), Stopping(max_new_tokens=limit, eos_token_ids=eos, stop_strings=tuple(stops)),
                criteria=stop_string_criteria(tokenizer, stops))
    assert ours == theirs


# --------------------------------------------------------------------------- options
def test_choose_sampling_greedy_unless_asked():
    assert choose_sampling() == Sampling()
    assert not choose_sampling(temperature=0).do_sample  # vLLM's convention: 0 is greedy
    assert not choose_sampling(temperature=0.0, top_k=5, top_p=0.5, seed=3).do_sample
    assert choose_sampling(repetition_penalty=1.2) == Sampling(repetition_penalty=1.2)
    assert choose_sampling(seed=7) == Sampling(seed=7)  # a seed alone does not sample


def test_choose_sampling_leaves_what_is_not_given_off():
    s = choose_sampling(temperature=0.7, seed=1)
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.seed) == (True, 0.7, 0, 1.0, 1)  # no top_k=50
    s = choose_sampling(top_k=5, seed=2)
    assert (s.do_sample, s.temperature, s.top_k, s.top_p) == (True, 1.0, 5, 1.0)
    s = choose_sampling(top_p=0.9, repetition_penalty=1.1, seed=3)
    assert (s.do_sample, s.top_p, s.repetition_penalty) == (True, 0.9, 1.1)
    assert isinstance(choose_sampling(temperature=2, seed=0).temperature, float)


def test_a_sampled_run_without_a_seed_gets_one():
    seeds = {choose_sampling(temperature=1.0).seed for _ in range(8)}
    assert None not in seeds and all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    assert len(seeds) > 1  # random, and kept in the result so the run can be repeated


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(repetition_penalty=0), dict(seed=-1), dict(temperature="hot"),
                                 dict(top_k=2.5), dict(temperature=float("nan"))])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(MpbookError) as err:
        choose_sampling(**bad)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- latency figures
def result_with_times(token_times: list[list[float]]):
    from mpbook.layout import Layout
    from mpbook.results import RunResult

    n = len(token_times)
    return RunResult(
        strategy="data", model="tiny", layout=Layout(dp=1), dtype="float32", microbatches=1, max_new_tokens=64,
        prompts=["p"] * n, prompt_tokens=[3] * n, token_ids=[[7] * len(t) for t in token_times], texts=[""] * n,
        logits=None, prefill_seconds=0.1, decode_seconds=1.0, peak_memory_bytes=[1], weight_bytes=[1],
        kv_cache_bytes=[1], collectives=[{}], collective_seconds=[0.0], timeline=[], token_times=token_times,
        stop_reasons=["length"] * n,
    )


def test_ttft_and_itl_percentiles_are_numpys():
    rng = np.random.default_rng(0)
    times = [list(0.05 + np.cumsum(rng.exponential(0.02, n))) for n in (1, 2, 5, 30, 0)]
    result = result_with_times(times)
    assert result.ttft_s == [t[0] for t in times[:4]] + [None]
    for q in (0, 10, 50, 90, 99, 100):
        got = result.itl_s(q)
        assert got[0] is None and got[4] is None  # one token: no gap
        for g, t in zip(got[1:4], times[1:4]):
            assert g == pytest.approx(np.percentile(np.diff(t), q), rel=1e-12)


def test_latency_summary_pools_prompts_like_vllm():
    rng = np.random.default_rng(1)
    times = [list(0.1 + np.cumsum(rng.exponential(0.01, n))) for n in (3, 8, 20)]
    summary = result_with_times(times).latency_summary()
    ttft = [t[0] for t in times]
    gaps = np.concatenate([np.diff(t) for t in times])
    expected = (f"TTFT median {np.percentile(ttft, 50) * 1e3:.0f} ms p90 {np.percentile(ttft, 90) * 1e3:.0f} ms, "
                f"ITL median {np.percentile(gaps, 50) * 1e3:.1f} ms p90 {np.percentile(gaps, 90) * 1e3:.1f} ms")
    assert summary == expected
    assert result_with_times([[]]).latency_summary() == ""
    assert result_with_times([[0.25]]).latency_summary() == "TTFT median 250 ms p90 250 ms"


def test_record_carries_latency_per_prompt():
    times = [[0.1, 0.2, 0.4], [0.3]]
    record = result_with_times(times).record()
    assert record["ttft_s"] == [0.1, 0.3]
    assert record["itl_median_s"][0] == pytest.approx(0.15) and record["itl_median_s"][1] is None
    assert record["generated_tokens"] == 4
    # Pooled over the prompts, as the summary line and the bench table say them.
    assert record["latency"] == pytest.approx(
        {"ttft_median_s": 0.2, "ttft_p90_s": 0.28, "itl_median_s": 0.15, "itl_p90_s": 0.19})
    assert result_with_times([[]]).record()["latency"] == {}


# --------------------------------------------------------------------------- the reference's rows
def test_reference_rows_end_where_generate_ended_them(tiny_folder):
    """mpbook.reference trims each of generate()'s rows after its finishing token. A stop
    string finishes a row as StopStringCriteria sees it: the text of the prompt and the new
    ids, matched also inside the last token ("on" ends a row at "money"). Trimming where
    the decoded new text *ends with* the stop string keeps generate()'s padding after such a
    row as if the model had said it."""
    from mpbook.models import load_tokenizer
    from mpbook.reference import reference

    prompts = ["Explain pipeline parallelism in one sentence.", "Hi", "What does an all-reduce do?"]
    tok = load_tokenizer(tiny_folder)
    criteria = StopStringCriteria(tok, ["on"])
    encoded = encode_prompts(tok, prompts).input_ids
    _, rows = reference(tiny_folder, prompts, max_new_tokens=12, stop_strings=["on"])
    for prompt, row in zip(encoded, rows):
        for i in range(len(row) - 1):  # every token before the last leaves the row going
            assert row[i] not in (EOS_ID, IM_END_ID)
            assert not criteria(torch.tensor([list(prompt) + row[: i + 1]]), None)[0], (
                f"generate() finished this row at token {i} ({tok.decode(row[: i + 1])!r}); "
                f"the reference keeps {row[i + 1:]}")
