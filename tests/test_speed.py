"""The speed model (mpbook.planner.speed) against hand-worked cases, and its calibration on real engines.

The hand-worked cases use the ``tiny`` preset (6 layers of width 64, MLP 128, 8 query heads of 8
over 4 KV heads, a 394-token vocabulary tied to the head; float32) and a calibration written
by hand, so every figure below can be checked with a pencil:

- a decoder layer's weights: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 64x128 each
  + two norms of 64 = 36,992 parameters = 147,968 bytes;
- the final norm: 256 bytes; the head: 394 x 64 x 4 = 100,864 bytes.

The hand calibration's host time, 1 ms a layer + 0.5 ms around the layers + 1.5 ms for the head
and the choice, makes one device's step 6 + 0.5 + 1.5 = 8 ms of host.
"""

from __future__ import annotations

import time

import pytest

import mpbook
from mpbook.planner.calibration import Calibration, Cost, HostTime, Rates

LAYER_BYTES = 147_968
NORM_BYTES = 256
HEAD_BYTES = 100_864
MS = 1e-3


def hand_calibration(*, engines: int = 2, together_factor: float = 1.0) -> Calibration:
    """1 ns per weight byte at every row count (1 GB/s); host: 1 ms per layer, 0.5 ms around
    the layers (every stage), 1.5 ms for the head and the token's choice; all-reduce 10 us + 1 ns/byte, send 5 us + 2 ns/byte. ``together_factor`` slows every
    figure by that much when every engine is busy."""
    def rates(f: float) -> Rates:
        return Rates({1: 1e-9 * f, 512: 1e-9 * f}, {"llama": {1: HostTime(1 * MS * f, 0.5 * MS * f, 1.5 * MS * f)}})

    return Calibration(key="hand", device="cpu", threads=1, engines_per_host=engines, transport="mpi", dtype="float32",
                       alone=rates(1.0), together=rates(together_factor), all_reduce=Cost(10e-6, 1e-9),
                       send=Cost(5e-6, 2e-9))


def planned(engines: int = 1, calibration=None, **layout):
    return mpbook.plan("tiny", **layout, batch=layout.pop("batch", 1) if "batch" in layout else 1, prompt_len=10,
                       max_new_tokens=11, device_memory_bytes=1 << 30, suggestions=False,
                       calibration=calibration or hand_calibration(engines=engines))


def test_one_device_decode_step_by_hand():
    p = planned(1)
    (rank,) = p.speed.ranks
    weights = 6 * LAYER_BYTES + NORM_BYTES + HEAD_BYTES  # the tied head reads the embedding's matrix
    assert rank.work.weight_bytes == weights
    # KV cache: 2 x 6 layers x 1 row x 4 KV heads x 8 x 4 bytes per position, at the decode's mean
    # length (10 prompt + 10/2) = 15 positions.
    assert rank.work.kv_bytes == pytest.approx(2 * 6 * 4 * 8 * 4 * 15)
    assert rank.parts["weights"] == pytest.approx(weights * 1e-9)
    assert rank.parts["kv cache"] == pytest.approx(2 * 6 * 4 * 8 * 4 * 15 * 1e-9)
    assert rank.parts["host"] == pytest.approx(6 * MS + 2 * MS)
    assert rank.parts["collectives"] == rank.parts["sends"] == 0
    step = weights * 1e-9 + 2 * 6 * 4 * 8 * 4 * 15 * 1e-9 + 8 * MS
    assert p.speed.decode_tokens_per_s == pytest.approx(1 / step)
    assert p.speed.bound == "host-bound"
    # The prefill: 10 tokens are 10 rows through the same weights, then the same host time.
    assert p.speed.prefill_s == pytest.approx(weights * 1e-9 + 8 * MS)
    assert p.speed.prefill_tokens_per_s == pytest.approx(10 / (weights * 1e-9 + 8 * MS))


def test_tensor_parallel_collectives_by_hand():
    p = mpbook.plan("tiny", tp=2, batch=4, prompt_len=10, max_new_tokens=11, device_memory_bytes=1 << 30,
                    suggestions=False, calibration=hand_calibration())
    for rank in p.speed.ranks:
        w = rank.work
        # o_proj and down_proj are row-split: one all-reduce each per layer, of 4 rows x 64 x 4
        # bytes; and the vocabulary-split embedding sums its rows once.
        assert (w.all_reduces, w.all_reduce_bytes) == (2 * 6 + 1, 4 * 64 * 4)
        # The vocabulary-split head's logits are gathered once a step, in float32.
        assert (w.gathers, w.gather_bytes) == (1, 4 * 394 * 4)
        assert rank.parts["collectives"] == pytest.approx(13 * (10e-6 + 1024e-9) + (10e-6 + 4 * 394 * 4 * 1e-9))
        # Half of each layer's split projections and of the head; norms whole.
        assert w.weight_bytes == pytest.approx(6 * (LAYER_BYTES - 512) / 2 + 6 * 512 + NORM_BYTES + HEAD_BYTES / 2)
    step = p.speed.ranks[0].step_s
    assert p.speed.decode_tokens_per_s == pytest.approx(4 / step)


def test_pipeline_round_is_the_longer_of_the_way_round_and_the_slowest_stage_m_times():
    cal = hand_calibration()
    for m in (1, 2, 4):
        p = mpbook.plan("tiny", pp=2, batch=4, prompt_len=10, max_new_tokens=11, microbatches=m,
                        device_memory_bytes=1 << 30, suggestions=False, calibration=cal)
        first, last = p.speed.ranks
        assert first.work.layers == last.work.layers == 3
        assert first.parts["host"] == pytest.approx(3 * MS + 0.5 * MS)  # every stage: mask, positions, rotary
        assert last.parts["host"] == pytest.approx(3 * MS + 0.5 * MS + 1.5 * MS)  # and the head, the choice
        # Stage 0 sends its micro-batch's activation (rows x 64 x 4 bytes); the last, the tokens back.
        rows = 4 // m
        assert first.parts["sends"] == pytest.approx(5e-6 + rows * 64 * 4 * 2e-9)
        assert last.parts["sends"] == pytest.approx(5e-6 + rows * 8 * 2e-9)
        way_round = first.step_s + last.step_s
        round_s = max(way_round, m * last.step_s)
        assert p.speed.decode_round_s == [pytest.approx(round_s)]
        assert p.speed.decode_tokens_per_s == pytest.approx(4 / round_s)
        assert p.speed.bubble == pytest.approx(1 - m * way_round / (2 * round_s))
    # One micro-batch: each stage idles while the other works, about half the time.
    one = mpbook.plan("tiny", pp=2, batch=4, prompt_len=10, max_new_tokens=11, microbatches=1,
                      device_memory_bytes=1 << 30, suggestions=False, calibration=cal)
    assert 0.4 < one.speed.bubble < 0.6


def test_a_hop_measured_inside_a_step_replaces_the_back_to_back_send():
    """A pipeline hop priced as the reference run measured it (0.4 ms, against the probe's 5 us):
    each stage's sends pay it, and the round grows by it once per stage and micro-batch."""
    from dataclasses import replace

    cal = hand_calibration()
    slow = replace(cal, step_send_s=0.4 * MS)
    fast_p, slow_p = (mpbook.plan("tiny", pp=2, batch=4, prompt_len=10, max_new_tokens=11, microbatches=2,
                                  device_memory_bytes=1 << 30, suggestions=False, calibration=c) for c in (cal, slow))
    first, last = slow_p.speed.ranks
    assert first.parts["sends"] == pytest.approx(0.4 * MS + 2 * 64 * 4 * 2e-9)
    assert last.parts["sends"] == pytest.approx(0.4 * MS + 2 * 8 * 2e-9)
    # m = p = 2: the round is 2 x the slowest (the last) stage, each step 0.4 ms - 5 us dearer
    assert slow_p.speed.decode_round_s[0] - fast_p.speed.decode_round_s[0] == pytest.approx(2 * (0.4 * MS - 5e-6))
    assert "a pipeline hop 400 us inside a decode step" in slow.summary()
    # never cheaper than the back-to-back send
    assert replace(cal, step_send_s=1e-6).send_in_step() == cal.send


def test_a_reference_run_fits_the_one_value_it_measures():
    """calibrate()'s fit: the seconds at which a falling prediction meets the measured tok/s."""
    from mpbook.planner.calibrating import FIT_MAX_S, fitted

    def predicted(extra_s):  # 4 rows a step of 2 ms + 13 all-reduces of extra_s each
        return 4 / (2 * MS + 13 * extra_s)

    assert fitted(predicted, 4 / (2 * MS + 13 * 0.25 * MS)) == pytest.approx(0.25 * MS, rel=1e-9)
    assert fitted(predicted, 4 / (2 * MS)) is None  # no extra time is already as slow as measured
    assert fitted(predicted, 5000.0) is None  # faster than the probes allow: the probes stand
    assert fitted(predicted, 1e-3) == FIT_MAX_S  # slower than any hop explains: capped


def test_engines_busy_together_take_the_together_rates():
    """Two engines that slow each other down 2x when both work: data parallel on both pays it,
    and so does a pipeline (its waiting stage polls: it is busy too); one engine does not."""
    cal = hand_calibration(together_factor=2.0)
    alone = planned(1, cal)
    assert alone.speed.busy_engines == 1
    data = mpbook.plan("tiny", dp=2, batch=2, prompt_len=10, max_new_tokens=11, device_memory_bytes=1 << 30,
                       suggestions=False, calibration=cal)
    assert data.speed.busy_engines == 2
    assert data.speed.ranks[0].step_s == pytest.approx(2 * alone.speed.ranks[0].step_s)
    assert data.speed.decode_tokens_per_s == pytest.approx(2 * 1 / (2 * alone.speed.ranks[0].step_s))
    pipeline = mpbook.plan("tiny", pp=2, batch=2, prompt_len=10, max_new_tokens=11, microbatches=1,
                           device_memory_bytes=1 << 30, suggestions=False, calibration=cal)
    assert pipeline.speed.busy_engines == 2


def test_an_all_reduce_inside_a_step_costs_what_was_fitted_for_its_group_size():
    """tp=2 on two engines that slow each other down 2x when both work: every engine counts as
    busy (its compute at the rates of both working), and each all-reduce costs the latency fitted
    inside a step for groups of 2; a group size not fitted takes the nearest one's, scaled by
    log2 of the ranks; the back-to-back figure stays the floor."""
    from dataclasses import replace

    cal = replace(hand_calibration(together_factor=2.0), step_all_reduce_s={2: 0.3e-3})
    p = mpbook.plan("tiny", tp=2, batch=4, prompt_len=10, max_new_tokens=11, device_memory_bytes=1 << 30,
                    suggestions=False, calibration=cal).speed
    assert p.busy_engines == 2
    rank = p.ranks[0]
    # the host's 6 layers, the work around them and the head, at the rates of both engines busy
    assert rank.parts["host"] == pytest.approx((6 + 0.5 + 1.5) * MS * 2, rel=1e-6)
    w = rank.work
    assert cal.all_reduce_in_step(2) == Cost(pytest.approx(0.3e-3), 1e-9)
    assert rank.parts["collectives"] == pytest.approx(
        w.all_reduces * (0.3e-3 + w.all_reduce_bytes * 1e-9) + w.gathers * (0.3e-3 + w.gather_bytes * 1e-9))
    assert cal.all_reduce_in_step(4).latency_s == pytest.approx(0.6e-3)  # log2(4) / log2(2) x the fitted
    assert replace(cal, step_all_reduce_s={2: 1e-6}).all_reduce_in_step(2).latency_s == pytest.approx(10e-6)
    assert replace(cal, step_all_reduce_s={}).all_reduce_in_step(2).latency_s == pytest.approx(10e-6)
    assert "0.30 ms" in " ".join(p.arithmetic()) or "300 us" in " ".join(p.arithmetic())


def test_busy_engines_share_the_capacity_all_of_them_measured_and_interpolate_row_counts():
    # Four engines 3x slower each when all work: in all they do 4/3 of one alone's work.
    cal = hand_calibration(engines=4, together_factor=3.0)
    assert cal.rates(1).seconds_per_weight_byte[1] == pytest.approx(1e-9)
    assert cal.rates(4).seconds_per_weight_byte[1] == pytest.approx(3e-9)
    # 2 busy share that: 3 ns x 2/4 each; 1.2 busy would get more than one alone can: alone's
    assert cal.rates(2).host_time("llama", 1) == HostTime(pytest.approx(1.5 * MS), pytest.approx(0.75 * MS),
                                                          pytest.approx(2.25 * MS))
    assert cal.rates(1.2).seconds_per_weight_byte[1] == pytest.approx(1e-9)
    # Two engines 3x slower each: in all less than one alone, nothing to share: interpolated
    two = hand_calibration(engines=2, together_factor=3.0)
    assert two.rates(1).seconds_per_weight_byte[1] == pytest.approx(1e-9)
    assert two.rates(2).seconds_per_weight_byte[1] == pytest.approx(3e-9)
    assert two.rates(1.5).seconds_per_weight_byte[1] == pytest.approx(2e-9)
    # Host time grows with the rows: on the line through the measured row counts, and beyond.
    curve = Rates({1: 1.0}, {"llama": {1: HostTime(1.0, 2.0, 3.0), 8: HostTime(8.0, 9.0, 10.0)}})
    assert curve.host_time("llama", 4) == HostTime(4.0, 5.0, 6.0)
    assert curve.host_time("llama", 15) == HostTime(15.0, 16.0, 17.0)
    rates = Rates({1: 1.0, 3: 3.0}, {})
    assert rates.linear_seconds(2.0, 2) == pytest.approx(4.0)  # halfway between 1 and 3 rows
    assert rates.linear_seconds(1.0, 6) == pytest.approx(6.0)  # beyond the curve: time grows with the rows
    assert Cost.through((1000, 2e-6), (3000, 4e-6)) == Cost(pytest.approx(1e-6), pytest.approx(1e-9))


def test_calibration_survives_its_file():
    cal = hand_calibration()
    assert Calibration.from_json(cal.to_json()) == cal


def test_the_plan_shows_its_speed_arithmetic():
    p = planned(1)
    text = str(p)
    assert "Speed: predicted decode" in text and "host-bound" in text
    assert "rank 0 (stage 0, 6 layers, 1 rows)" in text
    assert "Speed" in p._repr_html_()
    assert mpbook.plan("tiny", batch=1, prompt_len=10, max_new_tokens=11, suggestions=False,
                       device_memory_bytes=1 << 30).speed is None


def test_calibration_on_real_engines(workbench):
    """Measured on the engines, kept (another test of this session may have measured it first),
    and what plan() uses for that cluster from then on."""
    cal = mpbook.calibrate(workbench)
    assert cal.engines_per_host == 2 and cal.ranks == 2 and cal.threads >= 1 and cal.transport in ("mpi", "gloo")
    assert 1e8 < cal.alone.bandwidth_bytes_per_s < 1e13
    one, eight = cal.alone.host_time("llama", 1), cal.alone.host_time("llama", 8)
    # (both measured; which is larger is not asserted: a busy machine reversed them once)
    assert 0 < one.per_layer_s and 0 < eight.per_layer_s and cal.all_reduce.latency_s > 0
    # the reference runs: factors, and an all-reduce's and a hop's time inside a real step (None
    # where the back-to-back figure already predicted the run no faster than it went)
    assert cal.engine_factor > 0 and cal.weights_factor > 0
    # (a fitted value always lies above the back-to-back figure: below it the prediction does not move)
    assert set(cal.step_all_reduce_s) <= {2}
    assert all(cal.all_reduce.latency_s < s <= 0.1 for s in cal.step_all_reduce_s.values())
    assert cal.step_send_s is None or cal.send.latency_s < cal.step_send_s <= 0.1
    began = time.perf_counter()
    assert mpbook.calibrate(workbench) == cal  # kept: read from disk, nothing measured again
    assert time.perf_counter() - began < 1.0
    p = mpbook.plan("tiny", tp=2, batch=2, prompt_len=8, max_new_tokens=8, engines=workbench, suggestions=False)
    assert p.speed is not None and p.speed.calibration == cal


def test_predicted_collectives_are_the_ones_the_engines_make(workbench):
    """What the speed model counts per decode step is what the engines count."""
    prompts = ["one two three", "four five six"]
    result = workbench.generate(prompts, strategy="tensor", model="tiny", max_new_tokens=6, ignore_eos=True,
                                chat=False)
    p = mpbook.plan("tiny", tp=2, batch=2, prompt_len=max(result.prompt_tokens), max_new_tokens=6,
                    device_memory_bytes=1 << 30, suggestions=False, calibration=hand_calibration())
    forwards = 6  # the prefill and 5 decode steps, each one forward through every layer
    for rank, counted in zip(p.speed.ranks, result.collectives):
        assert counted.get("all_reduce", 0) == forwards * rank.work.all_reduces
        assert counted.get("all_gather", 0) == forwards * rank.work.gathers
