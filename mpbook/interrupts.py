"""Ctrl-C held back while Python imports torch, transformers and a model's code.

An import cut by KeyboardInterrupt leaves a partly initialised module behind, and for torch's
C++ extensions that is fatal: what they registered stays registered, so the next import
fails ("Only a single TORCH_LIBRARY can be used to register the namespace ...") or aborts
the process ("generic_type: cannot initialize type ...: an object with that name is already
defined"). A kernel's first generation cell imports them for seconds, and so does each
engine as it first loads a model: a person who pressed stop then would lose the kernel or
the engines. mpbook holds the interrupt over those imports and raises it as soon as they
are done; the cell then ends as any interrupted cell does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_held: list[int] | None = None  # the interrupts held so far, while a hold is on


@contextmanager
def interrupt_held() -> Iterator[None]:
    """Run the block with SIGINT held; raise KeyboardInterrupt after it if one came.

    Python delivers signals to the main thread only, so elsewhere this holds nothing (and
    needs to hold nothing). A hold inside a hold is part of the outer one. An error raised
    by the block wins over an interrupt held meanwhile.
    """
    global _held
    if _held is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    _held = held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        _held = None
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if held:
        raise KeyboardInterrupt
