"""Calling the engines: run code or a function on some ranks, wait, and say what failed.

Everything here runs on the client's main thread. The wait loop wakes as soon as the work is
done (``AsyncResult.wait`` returns early), so waiting costs no latency; while the work runs
it prints new output every ``poll_s`` and calls the follower's tick (a dashboard's hook).

A follower is what an upper layer passes down to watch a call (the dashboard does): a
callable ``follow(result, ranks)`` returning a context manager that yields the wait loop's
tick. This module never imports the dashboard.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, Protocol, TextIO

from ..compat import ipyparallel as ipp_compat
from ..engine import group
from ..errors import CollectiveError, EngineDiedError, MpbookError, RankError, RankFailure, interrupted_on_ranks
from ..options import parse_ranks
from .health import EngineWatch, is_collective_failure

Follow = Callable[[Any, list[int]], ContextManager[Callable[[], None]]]


class Cluster(Protocol):
    """What calls need of a cluster (:class:`mpbook.cluster.lifecycle.Cluster` is one): named
    here, so that this module, which lifecycle uses to wait, does not import lifecycle back."""

    client: Any  # ipyparallel's Client
    timeout_s: float

    @property
    def world_size(self) -> int: ...

    def engine_ids(self, ranks: Sequence[int] | None = None) -> list[int]: ...

    def check_running(self, what: str) -> None: ...

    def watch(self) -> EngineWatch: ...

    def interrupt(self, ranks: Sequence[int] | None = None) -> None: ...

    def rebuild_group(self) -> None: ...


class Calls:
    """Run work on a cluster's ranks: code (``run``) or a function of the engine state (``apply``)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def run(self, code: str, ranks=None, *, stream: bool = True, follow: Follow | None = None) -> None:
        """Execute ``code`` on every rank (or ``ranks``) with the cell names bound."""
        cluster = self.cluster
        cluster.check_running("running a cell")
        chosen = parse_ranks(ranks, cluster.world_size)
        result = cluster.client[cluster.engine_ids(chosen)].execute(code, silent=False, block=False)
        self.wait(result, chosen, "the cell", stream=stream, follow=follow)

    def apply(self, fn: Callable[..., Any], *args: Any, ranks=None, stream: bool = True, what: str = "the call",
              follow: Follow | None = None, **kwargs: Any) -> list[Any]:
        """Call ``fn(state, *args, **kwargs)`` on each rank; return the values in rank order."""
        cluster = self.cluster
        cluster.check_running(what)
        chosen = parse_ranks(ranks, cluster.world_size)
        result = cluster.client[cluster.engine_ids(chosen)].apply_async(group.call, fn, *args, **kwargs)
        return self.wait(result, chosen, what, stream=stream, follow=follow)

    def wait(self, result, chosen: list[int], what: str, *, stream: bool, follow: Follow | None = None) -> list[Any]:
        """Wait for work on ``chosen`` ranks under ``follow``; after a failed collective or an
        interrupt, rebuild the process group so that the next call finds it whole."""
        cluster = self.cluster
        watching = follow(result, chosen) if follow is not None else contextlib.nullcontext(None)
        try:
            with watching as tick:
                return wait(result, chosen, stream=stream, on_tick=tick, what=what, watch=cluster.watch(),
                            on_interrupt=lambda: cluster.interrupt(chosen))
        except EngineDiedError:
            raise
        except KeyboardInterrupt:
            # An interrupted rank destroys its process group at once (so a peer waiting in a
            # collective with it fails fast instead of waiting out the timeout); the group
            # is then gone or broken on every rank: form it again before the next cell.
            if cluster.world_size > 1:
                self._rebuild_quietly()
            raise
        except RankError as err:
            if any(f.ename == "KeyboardInterrupt" for f in err.failures) and cluster.world_size > 1:
                # Engines interrupted without the client (Workbench.interrupt from another
                # thread, a signal from outside): they destroyed the group as above.
                self._rebuild_quietly()
                raise interrupted_on_ranks(err.failures, what=what) from None
            collective = [f.rank for f in err.failures if is_collective_failure(f)]
            if not collective:
                raise
            # The group is now broken on every rank, also on those whose cell succeeded.
            try:
                cluster.rebuild_group()
                why = None
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            raise CollectiveError(
                err.failures, collective=collective, ranks=chosen, what=what, rebuilt=why, timeout_s=cluster.timeout_s
            ) from None

    def _rebuild_quietly(self) -> None:
        try:
            self.cluster.rebuild_group()
        except BaseException:  # a second interrupt, a dead engine: the next call says so
            import logging

            logging.getLogger("mpbook").debug("rebuilding the group after an interrupt failed", exc_info=True)


class RankStreams:
    """Prints what each rank writes to stdout/stderr, each line labelled ``[rank N]``."""

    def __init__(self, result, ranks: Sequence[int], *, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self._result = result
        self._ranks = list(ranks)
        self._files = {"stdout": stdout, "stderr": stderr}
        self._printed = {(rank, name): 0 for rank in self._ranks for name in self._files}

    def flush(self, *, final: bool = False) -> None:
        # one metadata dict per target, filled in by the client's IO thread as output arrives
        for rank, md in zip(self._ranks, ipp_compat.target_metadata(self._result)):
            for name in ("stdout", "stderr"):
                text = md.get(name) or ""
                start = self._printed[(rank, name)]
                end = len(text) if final else text.rfind("\n", start) + 1
                if end <= start:
                    continue
                self._printed[(rank, name)] = end
                out = self._files[name] or getattr(sys, name)
                out.write("".join(f"[rank {rank}] {line}\n" for line in text[start:end].splitlines()))
                out.flush()


def failures_of(values: Sequence[Any], ranks: Sequence[int]) -> list[RankFailure]:
    """The exceptions among ``values`` (one per rank, in rank order), as RankFailures."""
    from ipyparallel.error import RemoteError

    failures = []
    for rank, value in zip(ranks, values):
        if isinstance(value, RemoteError):
            tb = value.traceback
            lines = tb.splitlines() if isinstance(tb, str) else list(tb or [])
            failures.append(RankFailure(rank, value.ename, str(value.evalue), lines))
        elif isinstance(value, BaseException):
            failures.append(RankFailure(rank, type(value).__name__, str(value), []))
    return failures


def wait(
    result,
    ranks: Sequence[int],
    *,
    stream: bool = True,
    on_tick: Callable[[], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
    poll_s: float = 0.05,
    what: str = "the cell",
    watch: EngineWatch | None = None,
) -> list[Any]:
    """Wait for ``result`` (one target per rank, in rank order) and return its values.

    Raises :class:`RankError` naming every rank that raised. On KeyboardInterrupt,
    ``on_interrupt`` (which signals the engines) runs before the interrupt propagates.
    With a ``watch``, an engine that dies ends the wait at once with
    :class:`EngineDiedError` (the other ranks are interrupted), instead of after every
    other rank has finished its cell.
    """
    streams = RankStreams(result, ranks) if stream else None
    try:
        while not result.ready():
            result.wait(poll_s)
            if streams is not None:
                streams.flush()
            if on_tick is not None:
                on_tick()
            if watch is not None:
                _raise_if_dead(watch, result, ranks, streams, what)
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        _settle(result, streams)
        raise
    if streams is not None or on_tick is not None:
        # Output and telemetry messages may trail the reply by a moment; ipyparallel tracks
        # when the engine went idle, which comes after its last output.
        result.wait_for_output(timeout=1.0)
    if streams is not None:
        streams.flush(final=True)
    if on_tick is not None:
        on_tick()
    values = result.get(return_exceptions=True)
    if len(ranks) == 1 and not isinstance(values, list):
        values = [values]
    failures = failures_of(values, ranks)
    if failures:
        raise RankError(failures, what=what)
    return list(values)


def _settle(result, streams: RankStreams | None, timeout_s: float = 3.0, only: Sequence[int] | None = None) -> None:
    """Give the engines a moment to report what an interrupt did to them, and show it.

    ``only``: positions (in rank order) worth waiting for; a dead engine's reply comes
    when the controller notices, which may be seconds later.
    """
    if only is not None:
        ipp_compat.wait_for_targets(result, only, timeout_s)
    else:
        deadline = time.monotonic() + timeout_s
        while not result.ready() and time.monotonic() < deadline:
            result.wait(0.05)
    if streams is not None:
        streams.flush(final=True)


def _raise_if_dead(watch: EngineWatch, result, ranks: Sequence[int], streams: RankStreams | None, what: str) -> None:
    if watch.controller_dead():
        raise MpbookError(
            f"the cluster's controller (pid {watch.controller_pid}) died while running {what}; "
            "run `%mp restart` (or Workbench.restart()) to bring the cluster back"
        )
    dead = watch.dead(ranks)
    if not dead:
        return
    survivors = [r for r in ranks if r not in dead]
    if survivors:
        # Their work cannot complete (a collective would wait for the dead rank) and would
        # hold up the next cell; a restart replaces them anyway.
        try:
            watch.interrupt(survivors)
        except Exception:
            pass
        _settle(result, streams, only=[i for i, rank in enumerate(ranks) if rank not in dead])
    elif streams is not None:
        streams.flush(final=True)
    raise EngineDiedError(dead, what=what, hosts=watch.hosts, causes=watch.causes(dead))
