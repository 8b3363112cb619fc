"""The engine's IPython hooks: how it reports errors, and what it does after a cell that
was interrupted."""

from __future__ import annotations

from typing import Callable

from .state import EngineState, current


def plain_tracebacks() -> None:
    """Report this engine's errors with Python's own traceback format (``%xmode Plain``).

    IPython's default mode parses every source file in the stack (torch's and the model's)
    to show context around each frame: 1-3 s on a busy CPU before the error reaches the
    client, which holds up every interrupt and failure of a run (its ranks all report one).
    Plain mode keeps each frame's file, line and code, and takes milliseconds."""
    from IPython import get_ipython

    get_ipython().InteractiveTB.set_mode("Plain")


def after_interrupted_cells(state: EngineState, abort: Callable[[EngineState], None]) -> None:
    """A ``%%mp run`` cell interrupted on this rank may have left a collective unfinished:
    ``abort`` the group as an interrupted apply does (the client forms it again)."""
    from IPython import get_ipython

    def after(result) -> None:
        if isinstance(result.error_in_exec, KeyboardInterrupt) and current() is state:
            abort(state)

    def before(info) -> None:
        # A cell's own tokens are this rank's alone, whatever replica the last strategy run
        # made it part of (the dashboard counts each replica's tokens once).
        state.telemetry.replica = state.rank

    get_ipython().events.register("post_run_cell", after)
    get_ipython().events.register("pre_run_cell", before)
