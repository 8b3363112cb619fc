"""What a view is given and what it must do: one interface for the widget and the text view.

The dashboard builds a :class:`Frame` (everything to show, already in words and numbers) and
hands it to its view; the view decides how to show it (widgets whose values change, or lines
of text at a measured pace). The dashboard never asks which kind of view it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..layout import ranks_by_host
from .snapshots import Row
from .texts import PromptText

# ready, running, done, failed, interrupted, idle (a standing dashboard between calls), stopped
STATES = ("ready", "running", "done", "failed", "interrupted", "idle", "stopped")


@dataclass(frozen=True)
class Frame:
    """The dashboard at one moment."""

    call: int  # counts the calls this dashboard followed; a view resets its own state when it moves
    state: str
    headline: str
    rows: tuple[Row, ...]
    history: tuple[float, ...]  # the cluster's tokens/s at each refresh of this call
    rate_label: str  # what the plot's numbers are
    prompts: tuple[PromptText, ...]  # each prompt's text so far (a generation), else empty
    elapsed: float  # seconds since the call began (the client's clock)
    quiet: bool  # nothing worth a summary in text (no tokens, nothing printed during the call)
    tokens: bool = True  # the call has tokens to plot (a generation, or a cell that counted some)

    def by_host(self) -> list[tuple[str, tuple[Row, ...]]]:
        """The rows in runs by host, in rank order, when the engines are on several hosts;
        else [] (one host: the rows as they are)."""
        return rows_by_host(self.rows)


def rows_by_host(rows) -> list[tuple[str, tuple]]:
    """``rows`` (each with ``host``) in runs by host, when they are on several hosts; else []."""
    runs = ranks_by_host([row.host for row in rows])
    if len({host for host, _ in runs}) < 2:
        return []
    return [(host, tuple(rows[i] for i in positions)) for host, positions in runs]


def host_heading(host: str, ranks) -> str:
    """``"hosta: ranks 0, 1"``: the line over one host's rows."""
    ranks = list(ranks)
    return f"{host}: rank{'s' if len(ranks) != 1 else ''} {', '.join(str(r) for r in ranks)}"


class View(Protocol):
    #: True where the view changes in place (widgets) and so can follow idle engines between
    #: calls; False where it prints (a terminal has no event loop between commands).
    updates_in_place: bool

    def show(self) -> None:
        """Put the view on screen (once)."""

    def render(self, frame: Frame) -> None:
        """Show ``frame`` while a call runs or the dashboard idles (a view may skip frames)."""

    def finish(self, frame: Frame) -> None:
        """Show the end state: how the call ended, or a one-off look at the engines."""
