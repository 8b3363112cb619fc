"""Every user-facing argument, checked in one place.

Each ``check_*`` takes what a person gave (from Python, or a string from a magic line) and
returns the value or raises :class:`MpbookError` with a one-line message that names the
problem and the fix. The magics use the same functions as argparse types (:func:`argtype`),
so ``%mp start -n 0`` and ``Workbench.start(0)`` fail with the same words.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

from .errors import MpbookError
from .protocol import DTYPE_CHOICES, DTYPES, Sampling

DEFAULT_TIMEOUT_S = 60.0
# A collective that only some ranks enter waits this long before gloo/NCCL give up; longer
# would leave a notebook user staring at a cell that can never finish.
MAX_TIMEOUT_S = 60.0
DEFAULT_PERIOD_S = 1.0  # a standing dashboard's refresh while the engines are idle


def argtype(check: Callable[[Any], Any], name: str, flag: str) -> Callable[[str], Any]:
    """``check`` as an argparse ``type``: its MpbookError becomes argparse's usage error
    (which names the option itself: "argument -n: 'two': give a whole number, e.g. -n 2")."""

    def convert(text: str):
        try:
            return check(text)
        except MpbookError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag} ")) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def _number(value: Any, kind: type, flag: str, example: str, *, finite: bool = True):
    if isinstance(value, bool):
        raise MpbookError(f"{flag} {value!r}: give a number, e.g. {flag} {example}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        what = "a whole number" if kind is int else "a number"
        raise MpbookError(f"{flag} {value!r}: give {what}, e.g. {flag} {example}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise MpbookError(f"{flag} {value!r}: give a whole number, e.g. {flag} {example}")
    if kind is float and finite and not math.isfinite(number):
        raise MpbookError(f"{flag} {value!r}: give a finite number, e.g. {flag} {example}")
    return number


# ----------------------------------------------------------------------------- the cluster
def check_engine_count(n: Any) -> int:
    n = _number(n, int, "-n", "2")
    if n < 1:
        raise MpbookError(f"-n {n}: a cluster needs at least one engine; use -n 1 or more")
    return n


def check_threads(threads: Any) -> int | None:
    """Intra-op threads per engine; ``None``: the cores divided among the engines."""
    if threads is None:
        return None
    threads = _number(threads, int, "--threads", "1")
    if threads < 1:
        raise MpbookError(f"--threads {threads}: each engine needs at least one thread")
    return threads


def check_timeout(timeout_s: Any) -> float:
    """The collective timeout: more than 0 and at most MAX_TIMEOUT_S seconds."""
    value = _number(timeout_s, float, "--timeout", f"{DEFAULT_TIMEOUT_S:g}", finite=False)
    if not 0 < value <= MAX_TIMEOUT_S:  # also false for nan
        raise MpbookError(
            f"--timeout {timeout_s!r}: a collective may wait more than 0 and at most {MAX_TIMEOUT_S:g} s; "
            f"choose e.g. --timeout {DEFAULT_TIMEOUT_S:g}"
        )
    return value


def check_period(period_s: Any) -> float:
    value = _number(period_s, float, "--period", "1")
    if value <= 0:
        raise MpbookError(f"--period {period_s!r}: refresh every so many seconds; use a number above 0, e.g. 1")
    return value


def parse_ranks(spec: str | int | Iterable[int] | None, world_size: int) -> list[int]:
    """``None``/"all" -> every rank; "0,2" or "1-3" or [0, 2] -> those ranks, checked."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(world_size))
    have = f"the cluster has ranks 0-{world_size - 1} ({world_size} engines)"
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, str):
        ranks = []
        for part in spec.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                raise MpbookError(
                    f"--ranks {spec!r}: write ranks as numbers, ranges or 'all', e.g. 0,2 or 0-{world_size - 1}"
                ) from None
            if first > last:
                raise MpbookError(f"--ranks {spec!r}: {part} is an empty range; write ranges low-high, e.g. 0-{world_size - 1}")
            # Checked before expanding: a typo such as 0-99999999999 must not build a huge list.
            if first < 0 or last >= world_size:
                lo, hi = (max(first, world_size), last) if last >= world_size else (first, min(last, -1))
                which = f"rank {lo} does" if lo == hi else f"ranks {lo}-{hi} do"
                raise MpbookError(f"--ranks {spec!r}: {have}; {which} not exist")
            ranks.extend(range(first, last + 1))
    else:
        ranks = [int(r) for r in spec]
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad or not ranks:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise MpbookError(
            f"--ranks {spec!r}: {have}; {'rank ' + shown + ' does not exist' if bad else 'no rank chosen'}"
        )
    return sorted(set(ranks))


# ----------------------------------------------------------------------------- a run
def check_degree(name: str, value: Any) -> int | None:
    if value is None:
        return None
    value = _number(value, int, f"--{name}", "2")
    if value < 1:
        raise MpbookError(f"--{name} {value}: a degree is a whole number >= 1")
    return value


def check_microbatches(value: Any) -> int:
    value = _number(value, int, "--microbatches", "2")
    if value < 1:
        raise MpbookError(f"--microbatches {value}: use at least 1")
    return value


def check_max_new_tokens(value: Any) -> int:
    value = _number(value, int, "--max-new-tokens", "32")
    if value < 0:
        raise MpbookError(f"--max-new-tokens {value}: use 0 (a forward pass) or more")
    return value


def check_dtype(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise MpbookError(f"--dtype {value}: choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def check_stage_sizes(value: Any) -> tuple[int, ...] | None:
    """``"4,2"`` or ``[4, 2]`` -> (4, 2): layers per pipeline stage."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in value.split(","))
        except ValueError:
            raise MpbookError(f"--stages {value}: write layers per stage as numbers, e.g. 4,2") from None
    return tuple(int(x) for x in value)


def check_temperature(value: Any) -> float:
    value = _number(value, float, "--temperature", "0.7")
    if value < 0:
        raise MpbookError(f"--temperature {value:g}: use 0 (greedy) or more, e.g. --temperature 0.7")
    return value


def check_top_k(value: Any) -> int:
    value = _number(value, int, "--top-k", "50")
    if value < 0:
        raise MpbookError(f"--top-k {value}: use 0 (off) or a positive number of tokens, e.g. --top-k 50")
    return value


def check_top_p(value: Any) -> float:
    value = _number(value, float, "--top-p", "0.9")
    if not 0 < value <= 1:
        raise MpbookError(f"--top-p {value:g}: a probability mass in (0, 1], e.g. --top-p 0.9")
    return value


def check_repetition_penalty(value: Any) -> float:
    value = _number(value, float, "--repetition-penalty", "1.1")
    if value <= 0:
        raise MpbookError(f"--repetition-penalty {value:g}: use a number above 0 (1 is off), e.g. 1.1")
    return value


def check_seed(value: Any) -> int | None:
    if value is None:
        return None
    value = _number(value, int, "--seed", "0")
    if not 0 <= value < 2**63:
        raise MpbookError(f"--seed {value}: use a whole number in 0..2**63-1")
    return value


def choose_sampling(*, temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None) -> Sampling:
    """Greedy unless a temperature, top-k or top-p is given (``temperature=0`` is greedy, as
    in vLLM); the options left out are off (not transformers' fallback of top_k=50). A
    sampled run without a seed gets a random one, kept in the result so it can be rerun."""
    temperature = None if temperature is None else check_temperature(temperature)
    top_k = None if top_k is None else check_top_k(top_k)
    top_p = None if top_p is None else check_top_p(top_p)
    penalty = 1.0 if repetition_penalty is None else check_repetition_penalty(repetition_penalty)
    seed = check_seed(seed)
    sample = any(v is not None for v in (temperature, top_k, top_p)) and temperature != 0
    if not sample:
        return Sampling(repetition_penalty=penalty, seed=seed)
    if seed is None:
        import secrets

        seed = secrets.randbits(32)
    return Sampling(temperature=temperature if temperature is not None else 1.0, top_k=top_k or 0,
                    top_p=top_p if top_p is not None else 1.0, repetition_penalty=penalty, seed=seed, do_sample=True)


def check_stop(value: Any) -> tuple[str, ...]:
    """``--stop`` strings: one str or several, none empty."""
    if value is None:
        return ()
    strings = (value,) if isinstance(value, str) else tuple(value)
    for text in strings:
        if not isinstance(text, str) or not text:
            raise MpbookError(f"--stop {text!r}: a stop string is some text, e.g. --stop '\\n\\n'")
    return strings
