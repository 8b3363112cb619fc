"""Generation as people use it, on real engines: sampling reproducible on every layout,
stopping early at end-of-sequence or a stop string as transformers' generate() does, live
tokens while a cell runs, and the latency figures of the result.

One module-scoped cluster of 2 CPU engines (gloo) serves data (dp=2), pipeline (pp=2, with 1
and 2 micro-batches) and tensor (tp=2) runs; a 1-engine cluster is the single device. The
references are transformers' own ``generate()`` in this process (mpbook.reference), for
sampling too: its ``torch.multinomial`` draws replaced by mpbook's per-prompt streams
(the same uniforms, one per row per step, through the same inverse CDF).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import shutil
import time

import pytest
import torch

from mpbook import Workbench
from mpbook.engine.choice import inverse_cdf, prompt_seed
from mpbook.models.tokenizer import EOS_ID, IM_END_ID
from mpbook.parallel.data import replica_rows
from mpbook.reference import reference
from mpbook.units import split_evenly

pytestmark = pytest.mark.cluster

# Different lengths on purpose: left padding and positions must be right for every row.
PROMPTS = [
    "Explain pipeline parallelism in one sentence.",
    "Hi",
    "What does an all-reduce do?",
    "Tensor parallel splits every weight matrix",
]
LAYOUTS = [
    pytest.param("data", {}, id="dp2"),
    pytest.param("pipeline", {}, id="pp2"),
    pytest.param("pipeline", {"microbatches": 2}, id="pp2-mb2"),
    pytest.param("tensor", {}, id="tp2"),
]
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)
NEW = 10  # new tokens of the sampled runs
CAP = 12  # --max-new-tokens of the runs that stop early


@pytest.fixture(scope="module")
def wb(workbench):
    """The session's shared two engines."""
    return workbench


@pytest.fixture(scope="module")
def single():
    """One engine: the single device."""
    with Workbench.start(1, cpu=True) as wb:
        yield wb


# --------------------------------------------------------------------------- references
@contextlib.contextmanager
def mpbook_draws(seed: int, rows: int):
    """generate()'s sampling with mpbook's random streams: prompt i draws one float64 uniform
    per step from its generator seeded with prompt_seed(seed, i) (finished rows too, as
    generate() samples every row), and the token is the inverse CDF of generate()'s own
    probabilities at that uniform."""
    generators = [torch.Generator().manual_seed(prompt_seed(seed, i)) for i in range(rows)]
    real = torch.multinomial
    calls = []

    def draw(probs, num_samples, *args, **kwargs):
        assert num_samples == 1 and probs.shape[0] == rows
        calls.append(1)
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        return inverse_cdf(probs, uniforms)[:, None].to(probs.device)

    torch.multinomial = draw
    try:
        yield calls
    finally:
        torch.multinomial = real


def sampled_reference(folder, prompts, *, seed: int, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
                      repetition_penalty=1.0) -> list[list[int]]:
    """transformers' generate(do_sample=True) with the options as mpbook reads them (an option
    left out is off: top_k=0, not generate()'s default of 50)."""
    with mpbook_draws(seed, len(prompts)) as calls:
        _, tokens = reference(folder, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                              temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    assert calls, "generate() did not sample through torch.multinomial"
    return tokens


@pytest.fixture(scope="module")
def free(tiny_folder):
    """Greedy tokens of the tiny model, CAP of them per prompt (none ends before the cap)."""
    _, tokens = reference(tiny_folder, PROMPTS, max_new_tokens=CAP)
    assert all(len(t) == CAP for t in tokens), "the construction below needs rows that run to the cap"
    return tokens


def with_eos(folder, tmp_path_factory, eos: list[int]) -> str:
    """A copy of ``folder`` whose generation config ends a row at any of ``eos``."""
    copy = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(folder, copy)
    path = copy / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = eos
    path.write_text(json.dumps(config))
    return str(copy)


def first_finish(row: list[int], eos: set[int]) -> int:
    """Tokens of ``row`` up to and including its first end-of-sequence id."""
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


@pytest.fixture(scope="module")
def early(tiny_folder, free, tmp_path_factory):
    """The tiny model (same weights) with end-of-sequence ids that its greedy rows produce
    early: prompts 0 and 1 (the first micro-batch of pp=2 with 2 micro-batches, the first dp
    replica) finish within 3 tokens, prompts 2 and 3 later but before the cap."""
    for first in ((1, 2), (2, 1), (1, 1), (2, 2), (0, 2), (2, 0)):
        for second in ((5, 7), (7, 5), (6, 8), (8, 6), (5, 8), (7, 9), (9, 7)):
            targets = [*first, *second]
            eos = {free[r][t] for r, t in enumerate(targets)}
            if eos & {0, EOS_ID, IM_END_ID}:
                continue
            finish = [first_finish(row, eos) for row in free]
            if max(finish[:2]) <= 3 and min(finish[2:]) >= 5 and max(finish) < CAP:
                folder = with_eos(tiny_folder, tmp_path_factory, [EOS_ID, IM_END_ID, *sorted(eos)])
                return folder, finish
    pytest.fail(f"no early end-of-sequence ids found in the greedy rows {free}")


def decode_steps(result) -> dict[tuple[int, int], int]:
    """Decode events per (rank, micro-batch) of a run's timeline."""
    steps: dict[tuple[int, int], int] = {}
    for e in result.timeline:
        if e.phase == "decode":
            steps[(e.rank, e.microbatch)] = steps.get((e.rank, e.microbatch), 0) + 1
    return steps


def expected_decode_steps(result) -> dict[tuple[int, int], int]:
    """What a rank's micro-batch costs when it ends with its longest row: the first token
    comes from the prefill, then one decode step per further token of its longest row."""
    layout = result.layout
    out = {}
    for rank in range(layout.world_size):
        dp = rank if layout.dp > 1 else 0
        rows = replica_rows(len(result.prompts), layout.dp, dp)
        for j, part in enumerate(split_evenly(len(rows), result.microbatches)):
            longest = max(len(result.token_ids[rows[i]]) for i in part)
            if longest > 1:
                out[(rank, j)] = longest - 1
    return out


# --------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def sampled_expected(tiny_folder):
    return sampled_reference(tiny_folder, PROMPTS, seed=1234, max_new_tokens=NEW, **SAMPLING)


@pytest.mark.parametrize("strategy, options", LAYOUTS)
def test_one_seed_gives_the_same_tokens_on_every_layout(wb, tiny_folder, sampled_expected, strategy, options):
    result = wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW, seed=1234,
                         **SAMPLING, **options)
    assert result.sampling.do_sample and result.sampling.seed == 1234
    assert result.token_ids == sampled_expected
    said = " ".join(result.summary().split())  # the summary's words, whatever its line breaks
    assert "tokens chosen: sampled (temperature 0.9, top-k 50, top-p 0.95, repetition penalty 1.1, seed 1234)" in said


def test_one_seed_gives_the_same_tokens_on_a_single_device(single, tiny_folder, sampled_expected):
    result = single.generate(PROMPTS, strategy="data", model=tiny_folder, max_new_tokens=NEW, seed=1234, **SAMPLING)
    assert result.layout.world_size == 1
    assert result.token_ids == sampled_expected


def test_another_seed_gives_other_tokens(wb, tiny_folder, sampled_expected):
    other = wb.generate(PROMPTS, strategy="tensor", model=tiny_folder, max_new_tokens=NEW, seed=1235, **SAMPLING)
    assert sum(a != b for a, b in zip(other.token_ids, sampled_expected)) >= 3
    assert other.token_ids == sampled_reference(tiny_folder, PROMPTS, seed=1235, max_new_tokens=NEW, **SAMPLING)


def test_a_run_without_a_seed_keeps_the_one_it_drew(wb, tiny_folder):
    first = wb.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=6, temperature=1.0)
    seed = first.sampling.seed
    assert isinstance(seed, int)
    again = wb.generate(PROMPTS, strategy="data", model=tiny_folder, max_new_tokens=6, temperature=1.0, seed=seed)
    assert again.token_ids == first.token_ids


def test_the_prompt_order_names_the_streams_not_the_batch_rows(wb, tiny_folder, sampled_expected):
    """Prompt i's stream is (seed, i): the first two prompts alone get the same tokens."""
    result = wb.generate(PROMPTS[:2], strategy="data", model=tiny_folder, max_new_tokens=NEW, seed=1234, **SAMPLING)
    assert result.token_ids == sampled_expected[:2]
    # three prompts cut unevenly: replicas of 2 + 1, micro-batches of 2 + 1
    for strategy, options in (("data", {}), ("pipeline", {"microbatches": 2})):
        result = wb.generate(PROMPTS[:3], strategy=strategy, model=tiny_folder, max_new_tokens=NEW, seed=1234,
                             **SAMPLING, **options)
        assert result.token_ids == sampled_expected[:3], strategy


@pytest.mark.parametrize("strategy, options", LAYOUTS)
def test_greedy_with_a_repetition_penalty_equals_generate(wb, tiny_folder, strategy, options):
    _, expected = reference(tiny_folder, PROMPTS, max_new_tokens=NEW, repetition_penalty=1.3)
    result = wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=NEW, repetition_penalty=1.3,
                         **options)
    assert not result.sampling.do_sample
    assert result.token_ids == expected


# --------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("strategy, options", LAYOUTS)
def test_rows_that_all_end_early_stop_early_like_generate(wb, early, strategy, options):
    folder, finish = early
    _, expected = reference(folder, PROMPTS, max_new_tokens=CAP)
    assert [len(t) for t in expected] == finish
    result = wb.generate(PROMPTS, strategy=strategy, model=folder, max_new_tokens=CAP, **options)
    assert result.token_ids == expected
    assert result.stop_reasons == ["eos"] * len(PROMPTS)
    assert result.new_tokens == sum(finish) < CAP * len(PROMPTS)
    # the loop stopped: each micro-batch ran one decode step per token of its longest row
    # after the first, on every rank (the first micro-batch of pp2-mb2 ends before the second)
    assert decode_steps(result) == expected_decode_steps(result)
    assert max(decode_steps(result).values()) < CAP - 1
    assert "4 by eos" in result.summary()


def test_ignore_eos_runs_every_row_to_the_cap(wb, early, free):
    folder, _ = early
    result = wb.generate(PROMPTS, strategy="pipeline", model=folder, max_new_tokens=CAP, microbatches=2,
                         ignore_eos=True)
    assert result.token_ids == free
    assert result.stop_reasons == ["length"] * len(PROMPTS)
    assert decode_steps(result) == {(r, j): CAP - 1 for r in range(2) for j in range(2)}


@pytest.fixture(scope="module")
def tokenizer_of_tiny(tiny_folder):
    from mpbook.models import load_tokenizer

    return load_tokenizer(tiny_folder)


def until_stopped(prompt_ids, row, criteria, eos) -> list[int]:
    """``row`` up to and including the token where generate() finishes it: an
    end-of-sequence id, or StopStringCriteria on the prompt and the new ids so far (it
    matches text, also inside the last token: "on" ends a row at "money")."""
    for i, token in enumerate(row):
        if token in eos or bool(criteria(torch.tensor([list(prompt_ids) + row[: i + 1]]), None)[0]):
            return row[: i + 1]
    return row


@pytest.fixture(scope="module")
def stopped(tiny_folder, free, tokenizer_of_tiny):
    """Stop strings, and the greedy rows as generate(stop_strings=...) ends them: a word of
    4 letters or more that prompt 0 says from step 2 on, a two-word phrase that prompt 2
    says from step 4 on, and 3 letters from inside a word that prompt 3 says from step 3 on,
    chosen so that each ends its row after a few steps.
    Greedy rows are the free rows up to their finish (a row's tokens do not depend on when
    the others finish)."""
    from transformers import StopStringCriteria

    from mpbook.session.prompts import encode_prompts

    tok = tokenizer_of_tiny
    prompts = encode_prompts(tok, PROMPTS).input_ids

    def words(row, at, count, letters=1):
        for i in range(at, CAP - count + 1):
            tokens = tok.convert_ids_to_tokens(row[i:i + count])
            if all(t.isalpha() and len(t) >= letters for t in tokens):  # no ## piece, punctuation, special
                yield tok.decode(row[i:i + count])

    def candidates():
        insides = [w[k:k + 3] for w in words(free[3], 3, 1, 5) for k in range(len(w) - 2)]
        for word, phrase, inside in itertools.product(words(free[0], 2, 1, 4), words(free[2], 4, 2), insides):
            yield [word, phrase, inside]

    for stops in candidates():
        criteria = StopStringCriteria(tok, stops)
        expected = [until_stopped(p, row, criteria, {EOS_ID, IM_END_ID}) for p, row in zip(prompts, free)]
        lengths = [len(t) for t in expected]
        if lengths[0] >= 3 and lengths[2] >= 5 and 4 <= lengths[3] < CAP:
            break
    else:
        pytest.fail(f"no stop strings found in the greedy rows {free}")
    # generate() itself agrees: its rows are these, then padding
    _, theirs = reference(tiny_folder, PROMPTS, max_new_tokens=CAP, stop_strings=stops)
    for mine, row in zip(expected, theirs):
        assert row[: len(mine)] == mine and set(row[len(mine):]) <= {tok.pad_token_id}
    return stops, expected


@pytest.mark.parametrize("strategy, options", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3]])
def test_stop_strings_end_rows_like_generate(wb, tiny_folder, stopped, strategy, options):
    stops, stopped = stopped
    result = wb.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=CAP, stop=stops, **options)
    assert result.token_ids == stopped
    assert result.stop_reasons == ["stop" if len(t) < CAP else "length" for t in stopped]
    assert decode_steps(result) == expected_decode_steps(result)


# --------------------------------------------------------------------------- live tokens
def test_the_published_stream_grows_while_the_run_goes(wb, tiny_folder):
    """While a long run goes, the choosing ranks' snapshots carry each prompt's tokens so far
    (a few times a second), growing; at the end they are the result's tokens."""
    seen: list[tuple[float, dict[int, int]]] = []  # (when, {prompt: tokens so far})
    last: dict[int, list[int]] = {}

    def tick():
        for msg_id in wb.client.history[-wb.world_size:]:  # the run's one call, one message per engine
            data = wb.client.metadata[msg_id].get("data") or {}
            stream = (data.get("telemetry") or {}).get("stream")
            if stream:
                for prompt, tokens in stream["rows"].items():
                    last[int(prompt)] = list(tokens)
                seen.append((time.perf_counter(), {int(p): len(t) for p, t in stream["rows"].items()}))

    began = time.perf_counter()
    result = wb.generate(PROMPTS[:2], strategy="data", model=tiny_folder, max_new_tokens=480, ignore_eos=True,
                         on_tick=tick)
    took = time.perf_counter() - began
    assert result.token_ids and all(len(t) == 480 for t in result.token_ids)
    for prompt in (0, 1):
        sizes = [counts[prompt] for _, counts in seen if prompt in counts]
        assert sizes == sorted(sizes), "a prompt's stream never shrinks"
        distinct = sorted(set(sizes) - {0, 480})
        assert len(distinct) >= 2, f"prompt {prompt}: {distinct} in {took:.1f} s"  # grew while the run went
        assert last[prompt] == result.token_ids[prompt][: len(last[prompt])]
    print(f"\nstream: {len(seen)} snapshots in {took:.1f} s; prompt 0 sizes "
          f"{sorted({c[0] for _, c in seen if 0 in c})}")


def test_the_result_carries_time_to_first_token_and_inter_token_latency(wb, tiny_folder):
    result = wb.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=8, microbatches=2,
                         ignore_eos=True)
    assert all(t is not None and 0 < t < result.prefill_seconds + result.decode_seconds + 1 for t in result.ttft_s)
    assert all(len(times) == 8 and times == sorted(times) for times in result.token_times)
    medians, p90s = result.itl_s(50), result.itl_s(90)
    assert all(m is not None and 0 <= m <= p for m, p in zip(medians, p90s))
    assert "TTFT median" in result.summary() and "ITL median" in result.summary()
    record = result.record()
    assert record["ttft_s"] == result.ttft_s and record["itl_p90_s"] == p90s
    print(f"\npipeline pp=2 mb=2: {result.latency_summary()}")


def test_streaming_off_gives_the_same_tokens(wb, tiny_folder, sampled_expected):
    result = wb.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=NEW, seed=1234,
                         stream=False, microbatches=2, **SAMPLING)
    assert result.token_ids == sampled_expected


def test_a_finished_run_reports_every_prompt_once(wb, early):
    folder, finish = early
    result = wb.generate(PROMPTS, strategy="data", model=folder, max_new_tokens=CAP)
    assert [len(t) for t in result.token_ids] == finish
    assert [len(t) for t in result.token_times] == finish
    assert dataclasses.asdict(result.sampling)["do_sample"] is False


# --------------------------------------------------------------------------- the summary
@pytest.fixture(scope="module")
def plain_folder(tiny_folder, tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template (a base model)."""
    plain = tmp_path_factory.mktemp("plain-tiny") / "model"
    shutil.copytree(tiny_folder, plain)
    (plain / "chat_template.jinja").unlink()
    return str(plain)


@pytest.mark.parametrize("plain, chat, said", [
    (False, None, "chat template applied (--no-chat for plain text)"),
    (False, False, "plain text (--no-chat): chat template not applied"),
    (True, None, "no chat template (the model has none): plain text"),
])
def test_the_summary_says_how_the_prompts_went_in_in_short_lines(wb, tiny_folder, plain_folder, plain, chat, said):
    result = wb.generate(PROMPTS, strategy="pipeline", model=plain_folder if plain else tiny_folder, max_new_tokens=4,
                         chat=chat)
    lines = result.summary().splitlines()
    assert lines[0] == f"pipeline ({result.layout}) on 2 engines:"
    assert lines[-1] == f"  {said}"
    assert "  tokens chosen: greedy" in lines
    # short lines: a notebook wraps a long one anywhere, mid-word too
    assert len(lines) >= 7 and all(len(line) <= 80 for line in lines), lines
    assert repr(result) == f"<RunResult pipeline ({result.layout}) on 2 engines: {result.new_tokens} new tokens>"
