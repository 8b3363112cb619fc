"""mpbook: try data, pipeline and tensor parallel LLM inference in a notebook.

``%load_ext mpbook`` registers the ``%mp`` and ``%%mp`` magics; :class:`Workbench` is the
same from plain Python.
"""

from .errors import MpbookError, RankError
from .layout import Layout
from .planner import MemoryPlan, plan
from .workbench import Workbench

__all__ = ["Layout", "MemoryPlan", "MpbookError", "RankError", "Workbench", "load_ipython_extension", "plan"]
__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    from .magics import MpMagics

    ipython.register_magics(MpMagics(ipython))


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get("MpMagics")
    if magics is not None:
        magics.close()
