"""Every user argument is checked once (mpbook.options), and the start plan is decided before
anything starts (mpbook.devices.EngineSpec); all of it without engines."""

from __future__ import annotations

import argparse
import math

import pytest

from mpbook import MpbookError, Workbench
from mpbook import options as o
from mpbook.devices import DEFAULT_CPU_ENGINES, EngineSpec, usable_cores


@pytest.mark.parametrize(
    "check, value, expected",
    [
        (o.check_engine_count, "3", 3),
        (o.check_engine_count, 2.0, 2),
        (o.check_threads, None, None),
        (o.check_threads, "4", 4),
        (o.check_timeout, "5", 5.0),
        (o.check_timeout, 60, 60.0),
        (o.check_period, "0.5", 0.5),
        (o.check_microbatches, "2", 2),
        (o.check_max_new_tokens, 0, 0),
        (o.check_dtype, "bf16", "bfloat16"),
        (o.check_dtype, "torch.float16", "float16"),
        (o.check_dtype, "float", "float32"),
        (o.check_stage_sizes, "4,2", (4, 2)),
        (o.check_stage_sizes, [3, 3], (3, 3)),
        (o.check_stage_sizes, None, None),
        (o.check_temperature, "0", 0.0),
        (o.check_top_k, 0, 0),
        (o.check_top_p, "1", 1.0),
        (o.check_repetition_penalty, 1.1, 1.1),
        (o.check_seed, None, None),
        (o.check_seed, "7", 7),
    ],
)
def test_good_values_come_back_typed(check, value, expected):
    got = check(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "check, value, message",
    [
        (o.check_engine_count, 0, "-n 0: a cluster needs at least one engine; use -n 1 or more"),
        (o.check_engine_count, "two", "-n 'two': give a whole number, e.g. -n 2"),
        (o.check_engine_count, 2.5, "-n 2.5: give a whole number, e.g. -n 2"),
        (o.check_engine_count, True, "-n True: give a number, e.g. -n 2"),
        (o.check_threads, 0, "--threads 0: each engine needs at least one thread"),
        (o.check_timeout, 0, "--timeout 0: a collective may wait more than 0 and at most 60 s"),
        (o.check_timeout, 61, "at most 60 s"),
        (o.check_timeout, math.nan, "at most 60 s"),
        (o.check_timeout, "inf", "at most 60 s"),
        (o.check_period, 0, "--period 0: refresh every so many seconds"),
        (o.check_period, "nan", "give a finite number"),
        (o.check_microbatches, 0, "--microbatches 0: use at least 1"),
        (o.check_max_new_tokens, -1, "--max-new-tokens -1: use 0 (a forward pass) or more"),
        (o.check_dtype, "float8", "--dtype float8: choose one of float32, bfloat16, float16"),
        (o.check_stage_sizes, "4,x", "--stages 4,x: write layers per stage as numbers, e.g. 4,2"),
        (o.check_temperature, -0.1, "--temperature -0.1: use 0 (greedy) or more"),
        (o.check_top_k, -1, "--top-k -1"),
        (o.check_top_p, 0, "--top-p 0: a probability mass in (0, 1]"),
        (o.check_top_p, 1.5, "--top-p 1.5"),
        (o.check_repetition_penalty, 0, "--repetition-penalty 0: use a number above 0"),
        (o.check_seed, -1, "--seed -1: use a whole number in 0..2**63-1"),
        (o.check_seed, 2**63, "--seed"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_option(check, value, message):
    with pytest.raises(MpbookError) as info:
        check(value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_check_degree():
    assert o.check_degree("tp", None) is None
    assert o.check_degree("tp", "4") == 4
    with pytest.raises(MpbookError, match="--pp 0: a degree is a whole number >= 1"):
        o.check_degree("pp", 0)


def test_argtype_gives_argparse_the_same_words_without_repeating_the_flag():
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("-n", type=o.argtype(o.check_engine_count, "int", "-n"))
    assert parser.parse_args(["-n", "3"]).n == 3
    with pytest.raises(argparse.ArgumentError) as info:
        parser.parse_args(["-n", "0"])
    assert str(info.value) == "argument -n: 0: a cluster needs at least one engine; use -n 1 or more"


def test_parse_ranks():
    assert o.parse_ranks(None, 4) == [0, 1, 2, 3]
    assert o.parse_ranks("all", 4) == o.parse_ranks(" ALL ", 4) == o.parse_ranks("", 4) == [0, 1, 2, 3]
    assert o.parse_ranks("0,2", 4) == [0, 2]
    assert o.parse_ranks("1-3", 4) == [1, 2, 3]
    assert o.parse_ranks("3,0-1,1", 4) == [0, 1, 3]
    assert o.parse_ranks(2, 4) == [2]
    assert o.parse_ranks([2, 0], 4) == [0, 2]
    with pytest.raises(MpbookError, match="rank 5 does not exist"):
        o.parse_ranks("5", 4)
    with pytest.raises(MpbookError, match="ranks 4-99999999999 do not exist"):
        o.parse_ranks("0-99999999999", 4)  # checked before the range is built
    with pytest.raises(MpbookError, match="write ranks as numbers"):
        o.parse_ranks("one", 4)
    with pytest.raises(MpbookError, match="3-1 is an empty range"):
        o.parse_ranks("3-1", 4)
    with pytest.raises(MpbookError, match="the cluster has ranks 0-1 .* rank 7 does not exist"):
        o.parse_ranks([7], 2)


# ----------------------------------------------------------------------------- the start plan
def test_start_plan_one_engine_per_gpu_or_cpu_engines_sharing_the_cores():
    cores = usable_cores()
    assert EngineSpec.choose(None, gpus=3) == EngineSpec(n=3, use_gpu=True, threads=max(1, cores // 3))
    assert EngineSpec.choose(2, gpus=8) == EngineSpec(n=2, use_gpu=True, threads=max(1, cores // 2))
    assert EngineSpec.choose(3, cpu=True, gpus=8) == EngineSpec(n=3, use_gpu=False, threads=max(1, cores // 3))
    assert EngineSpec.choose(None, gpus=0) == EngineSpec(
        n=DEFAULT_CPU_ENGINES, use_gpu=False, threads=max(1, cores // DEFAULT_CPU_ENGINES)
    )
    assert EngineSpec.choose("2", cpu=True).n == 2


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((4,), {"gpus": 2}, r"-n 4: one engine per GPU and 2 GPUs are visible; use -n 2 or fewer, or --cpu for 4 CPU engines"),
        ((2,), {"gpus": 1}, r"-n 2: one engine per GPU and 1 GPU is visible"),
        ((2,), {"gpu": True, "gpus": 0}, "--gpu: no CUDA GPU is visible here"),
        ((2,), {"cpu": True, "gpu": True}, "--cpu and --gpu contradict each other"),
        ((0,), {"cpu": True}, "at least one engine"),
        ((10_000,), {"cpu": True}, r"-n 10000: \d+ cores cannot run that many CPU engines"),
    ],
)
def test_start_plan_refuses_what_cannot_start(args, kwargs, message):
    with pytest.raises(MpbookError, match=message):
        EngineSpec.choose(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0, "cpu": True}, "at least one engine"),
        ({"n": 2, "cpu": True, "timeout_s": 0}, "at most 60 s"),
        ({"n": 2, "cpu": True, "threads": 0}, "--threads 0"),
    ],
)
def test_bad_start_arguments_fail_before_anything_starts(kwargs, message):
    # (a test not marked `cluster` fails if it starts one: see conftest)
    with pytest.raises(MpbookError, match=message):
        Workbench.start(**kwargs)
