"""Errors that mpbook shows to a person at a notebook.

Every message is one line that names the problem and the fix; the remote traceback of a
failed rank is kept on the exception and rendered by IPython through ``_render_traceback_``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# torch.distributed's own error types (all RuntimeError subclasses), and mpbook's MPI timeout
# and a peer that left (mpbook.parallel.mpi): a send left pending there would be matched by the
# next run's receive.
COLLECTIVE_ERRORS = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "CollectiveTimeout",
                     "PeerLeft"}
# What gloo and NCCL say when a peer timed out, closed the connection or went away.
_COMM_MESSAGE = re.compile(r"gloo|nccl|pair closure|connection (?:closed|reset)|timed out waiting", re.IGNORECASE)


def collective_failed(ename: str, evalue: str) -> bool:
    """Whether an error of this type and message says a collective did not complete (the
    engines ask it of their own errors, the client of the ranks' reports)."""
    return ename in COLLECTIVE_ERRORS or (ename == "RuntimeError" and bool(_COMM_MESSAGE.search(evalue)))


class MpbookError(Exception):
    """A problem the user can fix; the message says how."""


class CellInterrupted(KeyboardInterrupt):
    """A cell the person interrupted: the engines stopped and the cluster is ready again.

    Still a KeyboardInterrupt, so the cell ends as interrupted and Jupyter's "Run All" stops
    there, as it does for plain Python; shown as one line, not a traceback through mpbook
    (IPython renders an exception's ``_render_traceback_`` instead of its traceback)."""

    MESSAGE = "interrupted: the engines stopped and the cluster is ready for the next cell"

    def __str__(self) -> str:
        return self.MESSAGE

    def _render_traceback_(self) -> list[str]:
        return [self.MESSAGE]


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

    def __init__(self, failures: list[RankFailure], *, what: str = "the cell", message: str | None = None):
        self.failures = sorted(failures, key=lambda f: f.rank)
        if message is None:
            first = self.failures[0]
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            message = f"{what} failed on {_ranks(self.ranks)}: {first.ename}: {first.evalue}{more}"
        super().__init__(message)

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


class EngineDiedError(RankError):
    """An engine process ended (killed, crashed, out of memory) while it had work to do."""

    def __init__(self, dead: dict[int, int | None], *, what: str = "the cell", earlier: bool = False,
                 hosts: Sequence[str] = (), causes: dict[int, str] | None = None):
        # dead: rank -> pid of its engine (None where mpbook does not know it); earlier: it
        # died before this call (found when checking the cluster), not while running it;
        # hosts: every rank's host, by rank: named when the engines are on several; causes:
        # rank -> the fatal error the engine reported as it died, where it left one.
        where = dict(enumerate(hosts)) if len(set(hosts)) > 1 else {}
        causes = causes or {}
        self.causes = dict(causes)
        failures = [
            RankFailure(rank, "EngineDied", f"the engine{_engine(pid, where.get(rank))} died"
                        + (f": {causes[rank]}" if rank in causes else ""), [])
            for rank, pid in dead.items()
        ]
        who = ", ".join(f"rank {rank}{_engine(pid, where.get(rank))}" for rank, pid in sorted(dead.items()))
        why = (" (" + "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(causes.items())) + ")"
               if causes else "")
        restart = "run `%mp restart` (or Workbench.restart()) to bring the cluster back"
        if earlier:
            message = f"{who} {'has' if len(dead) == 1 else 'have'} died{why}; {restart} before {what}"
        else:
            message = f"{who} died while running {what}{why}; {restart}"
        super().__init__(failures, what=what, message=message)


class CollectiveError(RankError):
    """A collective did not complete on every rank; the process group was rebuilt (or could not be)."""

    def __init__(self, failures: list[RankFailure], *, collective: list[int], ranks: list[int], what: str = "the cell",
                 rebuilt: str | None = None, timeout_s: float | None = None):
        # collective: the ranks whose error came from inside torch.distributed; ranks: those that ran the cell;
        # rebuilt: None when the group was rebuilt, else why rebuilding it failed.
        by_rank = {f.rank: f for f in failures}
        first = by_rank[collective[0]]
        waited = f" (it timed out after {timeout_s:g} s)" if timeout_s and "timed out" in first.evalue.lower() else ""
        parts = [f"{what} failed in a collective on {_ranks(collective)}{waited}: {first.ename}: {_short(first.evalue)}"]
        others = [f for f in failures if f.rank not in collective]
        if others:
            parts.append(f"{_ranks([f.rank for f in others])} raised {others[0].ename}: {_short(others[0].evalue)}")
        finished = [r for r in ranks if r not in by_rank]
        if finished:
            parts.append(f"{_ranks(finished)} finished {what} without error, so the ranks did not meet in the same collectives")
        if rebuilt is None:
            parts.append("the process group was rebuilt on every rank, so the next cell can use it (the loaded models stay)")
        else:
            parts.append(f"rebuilding the process group failed ({rebuilt}); run `%mp restart` (or Workbench.restart())")
        super().__init__(failures, what=what, message="; ".join(parts))
        self.collective_ranks = list(collective)
        self.rebuilt = rebuilt is None


def interrupted_on_ranks(failures: list[RankFailure], *, what: str = "the cell") -> RankError:
    """A run interrupted on some of its ranks, from outside the client (``Workbench.interrupt``
    from another thread, a signal): named first, before the ranks that stopped with them."""
    hit = [f.rank for f in failures if f.ename == "KeyboardInterrupt"]
    others = sorted((f for f in failures if f.ename != "KeyboardInterrupt"), key=lambda f: f.rank)
    message = f"{what} was interrupted on {_ranks(hit)} (KeyboardInterrupt)"
    if others:
        message += (f"; {_ranks([f.rank for f in others])} stopped with {'it' if len(hit) == 1 else 'them'}: "
                    f"{others[0].ename}: {_short(others[0].evalue)}")
    return RankError(failures, what=what, message=message)


def _engine(pid: int | None, host: str | None) -> str:
    """`` (pid 123) on hostb``: what is known of a dead engine."""
    return (f" (pid {pid})" if pid else "") + (f" on {host}" if host else "")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(str(r) for r in ranks)}"


def _short(text: str, limit: int = 160) -> str:
    """The gist of an error message on one line: gloo prefixes its messages with a source location."""
    import re

    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text.strip())
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
