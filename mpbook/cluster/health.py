"""Telling a failed cell from a broken cluster: dead engines and broken process groups.

Two things can leave the cluster unusable after a cell, and each has its own remedy:

- an engine process died (killed, crashed, out of memory). ipyparallel notices (the engine's
  nanny tells the controller at once; the heartbeat is the fallback) and fails the engine's
  outstanding work with ``EngineError``, but a multi-engine wait would still sit until every
  other engine finished its cell. :class:`EngineWatch` lets the wait loop notice the death
  itself and stop at once; only a restart brings the engine back.
- a collective did not complete on every rank (a rank raised inside it, or only some ranks
  entered it). gloo times out on the ranks that wait, and from then on the group is broken on
  *every* rank, even on those whose cell succeeded. :func:`is_collective_failure` recognises
  such an error so that :mod:`mpbook.cluster.calls` can rebuild the group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import RankFailure, collective_failed
from . import crash_report

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# (torch/distributed/_tools holds measuring tools such as MemTracker, not communication)
_DIST_FRAME = re.compile(r"torch[/\\]distributed[/\\](?!_tools[/\\])")


def is_collective_failure(failure: RankFailure) -> bool:
    """Whether a rank's error came from a collective, which leaves the process group broken.

    A plain mistake caught by torch.distributed's argument checks (a TypeError, a ValueError)
    is not one: nothing was sent, and the group is still good.
    """
    if collective_failed(failure.ename, failure.evalue):
        return True
    if failure.ename != "RuntimeError":
        return False
    return bool(_DIST_FRAME.search(_ANSI.sub("", "\n".join(failure.traceback))))


class EngineWatch:
    """Which of a cluster's engines have died, asked cheaply many times a second.

    An engine counts as dead when the controller unregistered it (``client.ids`` no longer
    holds it) or, for engines that mpbook started on this host, when its process is gone.
    ``controller_pid`` (started clusters only): without a controller nothing reaches the
    engines, so its death is reported too.
    """

    def __init__(self, client, engine_ids: Sequence[int], pids: Sequence[int | None], controller_pid: int | None = None,
                 hosts: Sequence[str] = (), crash_reports: str | None = None):
        self.client = client
        self.engine_ids = list(engine_ids)  # by rank
        self.pids = list(pids)  # by rank; None where the process is not local
        self.controller_pid = controller_pid
        self.hosts = list(hosts)  # by rank, for the error that names a dead engine
        self.crash_reports = crash_reports  # the folder of the engines' crash reports, where they write them

    def dead(self, ranks: Sequence[int]) -> dict[int, int | None]:
        """rank -> engine pid, for each of ``ranks`` whose engine has died."""
        registered = set(self.client.ids)
        return {
            rank: self.pids[rank]
            for rank in ranks
            if self.engine_ids[rank] not in registered or not process_running(self.pids[rank])
        }

    def causes(self, dead: dict[int, int | None]) -> dict[int, str]:
        """rank -> the fatal error its engine reported as it died (an engine that crashed on a
        signal; :mod:`.crash_report`)."""
        found = {rank: crash_report.read(self.crash_reports, pid) for rank, pid in dead.items()}
        return {rank: cause for rank, cause in found.items() if cause}

    def interrupt(self, ranks: Sequence[int]) -> None:
        """SIGINT to the engines of ``ranks``: a KeyboardInterrupt in the cell they run."""
        import signal

        signal_engines(self.client, signal.SIGINT, [self.engine_ids[r] for r in ranks])

    def controller_dead(self) -> bool:
        return not process_running(self.controller_pid)


def process_running(pid: int | None) -> bool:
    """True for a live process (or an unknown pid); a zombie has died but is not yet reaped."""
    if pid is None:
        return True
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signal_engines(client, sig: int, engine_ids: Sequence[int], timeout_s: float = 5.0) -> bool:
    """Send ``sig`` to engines through their nannies; False if they did not confirm in time.

    ipyparallel's blocking form waits without a limit, which never ends when the controller
    or a nanny has died: exactly when a person reaches for an interrupt or a stop.
    """
    import concurrent.futures

    if not engine_ids:
        return True
    try:
        client.send_signal(sig, targets=list(engine_ids), block=False).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return False
    except Exception:  # an engine already gone, a closed client
        return False
    return True
