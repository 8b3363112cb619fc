"""A dashboard that stays (``%mp dashboard``): it follows every call of the workbench and,
between calls, asks the idle engines for a snapshot every ``period_s``.

It joins and leaves the workbench's calls with ``follow_always()``/``unfollow()`` and reads
its ``ranks`` and ``stopped``. Between calls it goes to the engines itself, past the workbench's
calls (which would show on the dashboard as calls, and wait): with the workbench's ipyparallel
``client`` and ``engine_ids()`` it runs :func:`mpbook.engine.state.telemetry_snapshot` on every
engine, without blocking.

    >>> standing = stand(wb)                    # follows every call and refreshes between them
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..engine import state as engine_state
from ..options import DEFAULT_PERIOD_S
from .live import Dashboard

log = logging.getLogger("mpbook.dashboard")


class Standing:
    """Polls from an asyncio task on the kernel's event loop, so it never blocks the kernel:
    each await gives the loop back, and the kernel keeps serving cells and comms."""

    def __init__(self, workbench, dashboard: Dashboard, *, period_s: float = DEFAULT_PERIOD_S, timeout_s: float = 5.0):
        self.workbench = workbench
        self.dashboard = dashboard
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.polls = 0  # snapshots taken between calls (tests read it)
        self._task: asyncio.Task | None = None
        self._stopped = False

    def start(self) -> Standing:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or not self.dashboard.view.updates_in_place:
            # A terminal or script runs no event loop between commands, and a printing view
            # prints during calls already: show the engines' state once.
            self.poll_once()
            return self
        self.workbench.follow_always(self.dashboard)
        self.dashboard.show()
        self._task = loop.create_task(self._run())
        return self

    @property
    def running(self) -> bool:
        # A cancelled task ends at the loop's next turn; stopped already means no more polls.
        return self._task is not None and not self._task.done() and not self._stopped

    def _ask(self):
        wb = self.workbench
        return wb.client[wb.engine_ids()].apply_async(engine_state.telemetry_snapshot)

    def poll_once(self, timeout_s: float | None = None) -> None:
        """Take one snapshot of every engine now and show it (blocking; for terminals and scripts)."""
        result = self._ask()
        result.wait(timeout_s or self.timeout_s)
        self._take(result)
        self.dashboard.report("the engines now (a standing dashboard that refreshes needs a notebook)")

    def _take(self, result) -> bool:
        if not result.ready():
            return False
        values = result.get(return_exceptions=True)
        self.dashboard.update({r: v for r, v in zip(self.workbench.ranks, values) if isinstance(v, dict)})
        self.polls += 1
        return True

    async def _run(self) -> None:
        wb = self.workbench
        try:
            while not wb.stopped and not self._stopped:
                result = self._ask()
                deadline = time.monotonic() + self.timeout_s
                # Poll rather than block: the kernel keeps serving cells and comms meanwhile.
                while not result.ready() and time.monotonic() < deadline and not wb.stopped:
                    await asyncio.sleep(0.02)
                if self._take(result):
                    self.dashboard.idle(f"engines idle · refreshing every {self.period_s:g} s")
                    self.dashboard.refresh(force=True)
                await asyncio.sleep(self.period_s)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # never let a refresh error escape into the kernel
            log.debug("standing dashboard stopped", exc_info=True)
            self._end(f"stopped refreshing: {type(exc).__name__}: {exc}")
        finally:
            self._end()

    def _end(self, why: str | None = None) -> None:
        self.workbench.unfollow(self.dashboard)
        if self.dashboard.state == "stopped":
            return
        self.dashboard.stopped(why or ("the cluster stopped" if self.workbench.stopped else "stopped refreshing"))

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._end()


def stand(workbench, *, period_s: float = DEFAULT_PERIOD_S, mode: str = "auto") -> Standing:
    """Show a dashboard that follows every call and refreshes between them."""
    return Standing(workbench, Dashboard(workbench, mode=mode), period_s=period_s).start()
