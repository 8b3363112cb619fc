"""What mpbook needs from argparse beyond its public API (checked against Python 3.10-3.13).

The sub-commands of a parser and the options of each live in ``parser._actions`` and
``argparse._SubParsersAction``; argparse has no public way to list them.
"""

from __future__ import annotations

import argparse

CHECKED = "3.10-3.13"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Sub-command name -> its parser ({} for a parser without sub-commands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Sub-command name -> its one-line help, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument of ``parser`` (options and positionals)."""
    return list(parser._actions)


def appends(action: argparse.Action) -> bool:
    """Whether ``action`` collects its values in a list (``action="append"``)."""
    return isinstance(action, argparse._AppendAction)


def verify() -> None:
    import sys

    problems = []
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("x", help="the x command").add_argument("--y")
    if not appends(parser._actions[-1].choices["x"]._actions[0]) and not hasattr(argparse, "_AppendAction"):
        problems.append("argparse._AppendAction is gone")
    if not hasattr(argparse, "_SubParsersAction"):
        problems.append("argparse._SubParsersAction is gone")
    elif subcommands(parser).keys() != {"x"}:
        problems.append("sub-commands are no longer found in parser._actions")
    elif subcommand_help(parser) != {"x": "the x command"}:
        problems.append("_SubParsersAction._choices_actions no longer holds the sub-commands' help")
    elif "--y" not in {flag for a in actions(subcommands(parser)["x"]) for flag in a.option_strings}:
        problems.append("options are no longer found in parser._actions")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.argparse was checked against Python {CHECKED}; Python "
            f"{sys.version.split()[0]} differs: {'; '.join(problems)}"
        )
