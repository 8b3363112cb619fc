"""mpbook.interrupts: Ctrl-C held over imports that must not be cut, then raised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mpbook.interrupts import interrupt_held


def test_an_interrupt_during_the_block_is_raised_after_it():
    finished = []
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupt_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives here and is held
            finished.append("block")
    assert finished == ["block"]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler before is back


def test_no_interrupt_no_exception_and_an_error_of_the_block_wins():
    with interrupt_held():
        pass
    with pytest.raises(ValueError):
        with interrupt_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise ValueError("the block's own error")


def test_a_hold_inside_a_hold_is_part_of_the_outer_one():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_held():
            with interrupt_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            steps.append("after the inner hold")  # not raised yet: the outer hold is on
    assert steps == ["after the inner hold"]


def test_outside_the_main_thread_it_holds_nothing_and_sets_no_handler():
    seen = []

    def work():
        with interrupt_held():
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [before]


# Why it exists: torch cut in the middle of its import cannot be imported again in that process.
CUT_IMPORT = """
import os, signal, threading, sys
from mpbook.interrupts import interrupt_held
threading.Timer(float(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    with interrupt_held():
        import torch.distributed
        import transformers
except KeyboardInterrupt:
    done = all(name in sys.modules for name in ("torch", "torch.distributed", "transformers"))
    print("interrupted after the imports" if done else "interrupted during the imports", flush=True)
import torch.distributed
import transformers
print("imported again:", torch.distributed.is_available())
"""


def test_torch_and_transformers_import_again_after_an_interrupt_held_over_their_import():
    # 0.5 s in: mid-import on any machine (the two take seconds). Unheld, the second import
    # fails or aborts the process ("an object with that name is already defined").
    proc = subprocess.run([sys.executable, "-c", CUT_IMPORT, "0.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["interrupted after the imports", "imported again: True"], proc.stdout
