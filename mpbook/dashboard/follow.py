"""How dashboards watch a call: the follower that the workbench passes down.

The layers below never import the dashboard; they get a follower ``F`` and use it thus:

- the session (strategy runs) calls ``F.preparing(note)`` at each step of its own work before
  it calls the engines (the dashboards show at once), ``F.describe_run(info)`` before it
  dispatches, and ``F.show_result(result)`` once the ranks' outputs are merged; the workbench
  calls ``F.abandon(error)`` when the run ended before it reached the engines;
- the wait loop (:meth:`mpbook.cluster.calls.Calls.wait`) enters ``F(result, ranks)``, a
  context manager that yields its tick (called about twenty times a second).

A display problem must not cost the user their call: a dashboard that raises is logged once
and left alone for the rest of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .live import Dashboard

log = logging.getLogger("mpbook.dashboard")


class Follower:
    """``dashboards`` following one call (or one strategy run); ``on_tick`` runs on every tick."""

    def __init__(self, dashboards: Sequence[Dashboard], *, on_tick: Callable[[], None] | None = None):
        self.alive = list(dashboards)
        self.on_tick = on_tick
        self.run: Any = None  # what describe_run said about the run

    def _each(self, action: Callable[[Dashboard], None]) -> None:
        for d in list(self.alive):
            try:
                action(d)
            except Exception:
                self.alive.remove(d)
                log.warning("the mpbook dashboard stopped updating", exc_info=True)

    def describe_run(self, info: Any) -> None:
        """Before dispatch: ``info.prompts`` (list of str) and ``info.decode`` (token ids ->
        str) let each prompt's text grow in view while the run goes."""
        self.run = info

    def preparing(self, note: str) -> None:
        """Before dispatch, each step of the client's own work: the dashboards go on screen
        at once and say it (``"resolving the model tiny"``)."""
        self._each(lambda d: (d.show(), d.preparing(note)))

    def abandon(self, error: BaseException) -> None:
        """The call ended before it reached the engines: the dashboards still preparing say why."""
        self._each(lambda d: d.finish(error) if d.client_step is not None else None)

    def show_result(self, result: Any) -> None:
        """After merge: the end state shows the result's numbers and texts."""
        self._each(lambda d: d.show_result(result))

    @contextmanager
    def __call__(self, result, ranks: Sequence[int]) -> Iterator[Callable[[], None]]:
        ranks = list(ranks)
        run, self.run = self.run, None  # the description is this call's, not the next one's
        self._each(lambda d: (d.show(), d.begin(ranks, run=run)))

        def tick() -> None:
            self._each(lambda d: d.tick(result, ranks))
            if self.on_tick is not None:
                self.on_tick()

        try:
            yield tick
        except BaseException as exc:
            self._each(lambda d: (d.update_from(result, ranks), d.finish(exc)))
            raise
        self._each(lambda d: (d.update_from(result, ranks), d.finish()))


def follow(dashboards: Sequence[Dashboard], result=None, ranks: Sequence[int] | None = None, *,
           on_tick: Callable[[], None] | None = None):
    """``follow(dashboards, on_tick=...)``: a :class:`Follower` to pass down to a call.

    ``follow(dashboards, result, ranks, on_tick=...)``: the context manager of one call
    already dispatched (what ``Follower(...)(result, ranks)`` gives), yielding the tick.
    """
    follower = Follower(dashboards, on_tick=on_tick)
    if result is None:
        return follower
    return follower(result, ranks if ranks is not None else [])
