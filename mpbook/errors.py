"""Errors that mpbook shows to a person at a notebook.

Every message is one line that names the problem and the fix; the remote traceback of a
failed rank is kept on the exception and rendered by IPython through ``_render_traceback_``.
"""

from __future__ import annotations

from dataclasses import dataclass


class MpbookError(Exception):
    """A problem the user can fix; the message says how."""


class NoClusterError(MpbookError):
    def __init__(self, what: str = "this"):
        super().__init__(f"no cluster is running: start one with `%mp start` (or Workbench.start()) before {what}")


@dataclass(frozen=True)
class RankFailure:
    """What one rank raised."""

    rank: int
    ename: str
    evalue: str
    traceback: list[str]

    def summary(self) -> str:
        return f"rank {self.rank}: {self.ename}: {self.evalue}".rstrip(": ")


class RankError(MpbookError):
    """One or more ranks raised while running a cell or a strategy."""

    def __init__(self, failures: list[RankFailure], *, what: str = "the cell"):
        self.failures = sorted(failures, key=lambda f: f.rank)
        ranks = ", ".join(str(f.rank) for f in self.failures)
        first = self.failures[0]
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        super().__init__(
            f"{what} failed on rank{'s' if len(self.failures) > 1 else ''} {ranks}: "
            f"{first.ename}: {first.evalue}{more}"
        )

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.failures]

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the client-side stack, which would only
        # show mpbook's dispatch code; the useful frames are the rank's own.
        lines: list[str] = []
        for failure in self.failures:
            lines.append(f"[rank {failure.rank}] {failure.ename}: {failure.evalue}")
            lines.extend(failure.traceback)
        lines.append(f"{type(self).__name__}: {self}")
        return lines
