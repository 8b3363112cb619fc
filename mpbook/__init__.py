"""mpbook: try data, pipeline and tensor parallel LLM inference in a notebook.

``%load_ext mpbook`` registers the ``%mp`` and ``%%mp`` magics; :class:`Workbench` is the
same from plain Python.
"""

from .errors import MpbookError, RankError
from .layout import Layout
from .planner import MemoryPlan, plan
from .planner.calibrating import calibrate
from .workbench import Workbench

__all__ = [
    "Layout", "MemoryPlan", "MpbookError", "RankError", "Workbench", "calibrate", "explore", "load_ipython_extension",
    "plan",
]
__version__ = "0.1.0"


def explore(model, /, *, engines=None, **options):
    """A panel to try layouts of ``model`` on the cluster ``engines`` (default: the one ``%mp
    start`` started in this notebook): see :mod:`mpbook.explorer`."""
    from .explorer import Explorer

    return Explorer(model, engines=engines, **options)


def load_ipython_extension(ipython) -> None:
    from .magics import MpMagics

    ipython.register_magics(MpMagics(ipython))


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get("MpMagics")
    if magics is not None:
        magics.close()
