"""What mpbook needs from argparse beyond its public API (checked against Python 3.10-3.13).

The sub-commands of a parser and the options of each live in ``parser._actions`` and
``argparse._SubParsersAction``; whether an option collects a list is its class,
``argparse._AppendAction``. argparse has no public way to ask either.
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
    """Raise with a clear message if this Python's argparse lacks what the adapter uses."""
    import sys

    problems = [f"argparse.{name} is gone" for name in ("_SubParsersAction", "_AppendAction") if not hasattr(argparse, name)]
    if not problems:
        try:
            parser = argparse.ArgumentParser()
            sub = parser.add_subparsers(dest="command").add_parser("x", help="the x command")
            sub.add_argument("--y")
            sub.add_argument("--z", action="append")
            if not isinstance(getattr(parser, "_actions", None), list):
                problems.append("a parser no longer keeps its arguments in parser._actions")
            elif subcommands(parser).keys() != {"x"}:
                problems.append("sub-commands are no longer found in parser._actions")
            elif subcommand_help(parser) != {"x": "the x command"}:
                problems.append("_SubParsersAction._choices_actions no longer holds the sub-commands' help")
            else:
                options = {a.option_strings[-1]: a for a in actions(subcommands(parser)["x"]) if a.option_strings}
                if "--y" not in options:
                    problems.append("options are no longer found in parser._actions")
                elif appends(options["--y"]) or not appends(options["--z"]):
                    problems.append("an option given action='append' is no longer an argparse._AppendAction")
        except Exception as exc:
            problems.append(f"listing a parser's sub-commands failed: {type(exc).__name__}: {exc}")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.argparse was checked against Python {CHECKED}; Python "
            f"{sys.version.split()[0]} differs: {'; '.join(problems)}"
        )
