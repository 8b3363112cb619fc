"""Property-based tests of the %mp / %%mp argument parsing.

Whatever a person types after ``%mp``, parsing gives a Namespace whose values are what their
options declare, IPython's UsageError with a one-line message, or (for ``-h``/``--help``)
the help text to print; never another exception from inside mpbook, and never SystemExit
(argparse's habit on errors and --help).

The structured strategy walks ``build_parser()``, so sub-commands and options added later
are fuzzed without touching this file.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from mpbook.compat.argparse import actions, subcommands
from mpbook.magics import HelpRequested, build_parser, parse

# 150 examples per property keep the quick suite quick (each parse builds the whole parser);
# FUZZ_EXAMPLES=5000 searches harder. What earlier searches found is pinned with @example.
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


COMMANDS = subcommands(build_parser())
assert COMMANDS, "%mp has no sub-commands"


def options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in actions(sub) if a.option_strings]


def positionals(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in actions(sub) if not a.option_strings]


# Values that probe the edges of what an option's type accepts.
EDGE_VALUES = [
    "0", "1", "2", "-1", "60", "60.0", "61", "1e400", "-1e400", "nan", "inf", "-inf", "0.5", "1e-9",
    "99999999999999999999999", "", " ", "all", "0,1", "0-1", "1-0", "--", "-", "=", "'", '"', "\\",
    "two", "ä", "\x00", "0x10", "1_000", "+3", "−1",
]


def value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    choices = [str(c) for c in action.choices] if action.choices else []
    return st.one_of(
        st.sampled_from(choices or EDGE_VALUES),
        st.sampled_from(EDGE_VALUES),
        st.integers(-(10**6), 10**6).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=12),
    )


@st.composite
def structured_args(draw) -> str:
    """A sub-command (sometimes a wrong or misspelled one) with some of its real options."""
    name = draw(st.sampled_from(sorted(COMMANDS)))
    sub = COMMANDS[name]
    words = [draw(st.one_of(st.just(name), st.just(name), st.sampled_from(sorted(COMMANDS)), st.text(max_size=6)))]
    known = options(sub) + [a for other in COMMANDS.values() for a in options(other)]  # also borrow other commands' options
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(known)) if known else None
        if action is None or draw(st.integers(0, 9)) == 0:
            words.append(draw(st.sampled_from(EDGE_VALUES + ["--frob", "-x", "--help", "-h"])))
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if draw(st.integers(0, 5)) == 0:
            flag = flag[: max(2, len(flag) - draw(st.integers(0, 3)))]  # abbreviations, ambiguous or not
        takes_value = action.nargs != 0
        if takes_value and draw(st.integers(0, 7)) == 0:
            words.append(flag)  # the value is missing
        elif takes_value and draw(st.booleans()):
            words.append(f"{flag}={draw(value_for(action))}")
        elif takes_value:
            words.extend([flag, draw(value_for(action))])
        else:
            words.append(flag)
    for action in positionals(sub):
        if draw(st.booleans()):
            words.append(draw(value_for(action)))
    # Quote like a person at a shell would, and sometimes not at all (unbalanced quotes).
    if draw(st.booleans()):
        return " ".join(shlex.quote(w) for w in words)
    return " ".join(words)


def check_namespace(args: argparse.Namespace) -> None:
    """Every value is what its option declares: a known command, a listed choice, or the
    result of the option's own type (which re-reads its printed form to the same value)."""
    assert args.command in COMMANDS
    for action in actions(COMMANDS[args.command]):
        assert hasattr(args, action.dest), action.dest
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        if action.choices:
            assert value in action.choices, (action.dest, value)
        if action.nargs == 0:
            assert isinstance(value, bool) or value == action.const, (action.dest, value)
        elif action.type is not None and not isinstance(action.type, argparse.FileType):
            assert action.type(str(value)) == value, (action.dest, value)
        if isinstance(value, float):
            assert math.isfinite(value), (action.dest, value)


def check(line: str, cell: bool) -> None:
    try:
        args = parse(line, cell=cell)
    except HelpRequested as help:  # -h/--help: the magic prints this text instead of running
        assert "usage" in str(help).lower() or "Commands:" in str(help)
        assert "-h" in line or "help" in line, (line, str(help)[:200])  # asked for, not a fallback
        return
    except UsageError as exc:
        message = str(exc)
        assert message.strip(), "an empty usage message"
        assert "\n" not in message and "\r" not in message, message
        return
    # Anything else (SystemExit included) escapes and fails the test with its traceback.
    check_namespace(args)


@SETTINGS
@given(line=st.text(max_size=80), cell=st.booleans())
@example(line="", cell=False)
@example(line="--help", cell=False)
@example(line="start -h", cell=False)
# found by this test: float() accepts nan and overflows to inf
@example(line="start --timeout nan", cell=False)
@example(line="start --timeout 1e400", cell=False)
@example(line="start -n 0", cell=False)
@example(line="run --ranks 'unclosed", cell=True)
@example(line="start \\", cell=False)
@example(line="start --profile 'a\nb'", cell=False)
@example(line="start\x00", cell=False)
def test_any_text_parses_or_is_a_one_line_usage_error(line, cell):
    check(line, cell)


@SETTINGS
@given(line=structured_args(), cell=st.booleans())
# found by this test: argparse reads `--opt=--` and `-n--` as an empty list
@example(line="start --timeout=--", cell=False)
@example(line="start -n=--", cell=False)
@example(line="run --ranks=--", cell=True)
def test_real_commands_and_options_parse_or_are_a_one_line_usage_error(line, cell):
    check(line, cell)


def test_the_walk_finds_every_command_and_option():
    # The structured fuzzing above covers what the parser offers; make sure the walk sees it.
    assert {"start", "status", "stop", "restart", "run"} <= set(COMMANDS)
    flags = {flag for a in options(COMMANDS["start"]) for flag in a.option_strings}
    assert {"-n", "--cpu", "--gpu", "--timeout", "--profile", "--cluster-id"} <= flags
    assert "--ranks" in {flag for a in options(COMMANDS["run"]) for flag in a.option_strings}


# --ranks is parsed again once the cluster size is known.
rank_specs = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(
            st.integers(-3, 12).map(str),
            st.tuples(st.integers(-3, 10**12), st.integers(-3, 10**12)).map(lambda t: f"{t[0]}-{t[1]}"),
            st.sampled_from(["all", "ALL", " ", "", "-", "1-", "-1", "0--1", "1_0", "+1", "٣"]),
        ),
        min_size=1,
        max_size=5,
    ).map(",".join),
)


@SETTINGS
@given(spec=rank_specs, world_size=st.integers(1, 8))
@example(spec="0-99999999999", world_size=2)  # found by this test: it built a list of 10^11 ranks
def test_any_ranks_spec_gives_valid_ranks_or_a_short_one_line_error(spec, world_size):
    from mpbook import MpbookError
    from mpbook.options import parse_ranks

    try:
        ranks = parse_ranks(spec, world_size)
    except MpbookError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 200 + len(repr(spec)), message
        return
    assert ranks and ranks == sorted(set(ranks))
    assert all(0 <= r < world_size for r in ranks)
