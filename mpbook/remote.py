"""Waiting on engines: rank-labelled output while they run, errors that name the rank.

Everything here runs on the client's main thread. The loop wakes as soon as the work is done
(``AsyncResult.wait`` returns early), so waiting costs no latency; while the work runs it
prints new output every ``poll_s`` and calls ``on_tick`` (the dashboard's hook).
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .errors import EngineDiedError, MpbookError, RankError, RankFailure
from .health import EngineWatch


class RankStreams:
    """Prints what each rank writes to stdout/stderr, each line labelled ``[rank N]``."""

    def __init__(self, result, ranks: Sequence[int], *, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self._result = result
        self._ranks = list(ranks)
        self._files = {"stdout": stdout, "stderr": stderr}
        self._printed = {(rank, name): 0 for rank in self._ranks for name in self._files}

    def flush(self, *, final: bool = False) -> None:
        metadata = self._result._metadata  # one dict per target, filled in by the client's IO thread
        for rank, md in zip(self._ranks, metadata):
            for name in ("stdout", "stderr"):
                text = md.get(name) or ""
                start = self._printed[(rank, name)]
                end = len(text) if final else text.rfind("\n", start) + 1
                if end <= start:
                    continue
                self._printed[(rank, name)] = end
                chunk = text[start:end]
                out = self._files[name] or getattr(sys, name)
                lines = chunk.splitlines()
                out.write("".join(f"[rank {rank}] {line}\n" for line in lines))
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


def _settle(result, streams: RankStreams | None, timeout_s: float = 2.0, only: Sequence[int] | None = None) -> None:
    """Give the engines a moment to report what an interrupt did to them, and show it.

    ``only``: positions (in rank order) worth waiting for; a dead engine's reply comes
    when the controller notices, which may be seconds later.
    """
    children = getattr(result, "_children", None)  # one future per target, in order
    if only is not None and children and len(children) > max(only, default=-1):
        concurrent.futures.wait([children[i] for i in only], timeout=timeout_s)
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
    raise EngineDiedError(dead, what=what)
