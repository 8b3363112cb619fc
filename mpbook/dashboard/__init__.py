"""The live dashboard: one row per engine, fed by the engines' telemetry snapshots.

In a notebook it is a widget built and displayed once whose values then change; anywhere
else (a terminal IPython, a script, ``python -m mpbook demo``) the same figures print as a
few lines of text. Every figure belongs to the call that runs (one cell).

- :mod:`.snapshots`: the data model (each rank's snapshots of a call, the call's totals,
  memory against the device's capacity, rows);
- :mod:`.texts`: each prompt's text as it grows (live tokens);
- :mod:`.words`: the status line and the plot's label;
- :mod:`.view`: the one interface of the views (``show``, ``render(frame)``, ``finish(frame)``);
- :mod:`.widget` and :mod:`.text_view`: the two views;
- :mod:`.live`: the :class:`Dashboard`, fed by the wait loop's ticks;
- :mod:`.follow`: the :class:`Follower` passed down to a call (``describe_run``,
  ``show_result``, and the wait loop's context manager);
- :mod:`.standing`: a dashboard that follows every call and refreshes between them.

    >>> wb.run(code, dashboard=True)            # a dashboard for this call
    >>> dash = Dashboard(wb); wb.apply(fn, dashboard=dash)   # or one you keep
    >>> standing = stand(wb)                    # follows every call and refreshes between them
"""

from .follow import Follower, follow
from .live import Dashboard
from .standing import Standing, stand
from .widget import in_notebook

__all__ = ["Dashboard", "Follower", "Standing", "follow", "in_notebook", "stand"]
