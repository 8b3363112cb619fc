"""What an engine that crashed said last: Python's fatal-error report, read by the client.

An engine that dies of a signal (a segfault or heap corruption in a library, an abort in C++
code) leaves no traceback in the notebook, and its log goes with the stop. So each engine
mpbook starts has :mod:`faulthandler` write its report (the fatal signal and the Python stack of
the thread it hit) to a file named by the engine's pid in the temp folder, and the client,
finding an engine gone, reads that file on the same host and names the signal and the innermost
frame in the error (:class:`mpbook.errors.EngineDiedError`). A process killed outright (SIGKILL,
the kernel's out-of-memory killer) writes nothing: the error then says only that it died.
The engine removes its file when it ends normally; the client removes those of the engines on
its own host at the stop. Engines on other hosts write none (:data:`ENABLED_ENV`): the client
could not read them there.
"""

from __future__ import annotations

import os
import tempfile

_open_report = None  # the engine's own report file, open for as long as the process lives
# "0" in the environment of engines on other hosts: the client reads reports only on its own
# host, and a killed engine's empty file would stay in that host's temp folder.
ENABLED_ENV = "MPBOOK_CRASH_REPORT"


def report_path(pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"mpbook-engine-{pid}.crash")


def enable() -> None:
    """In an engine process: write faulthandler's report of a fatal signal to this engine's file
    (not on another host than the client's)."""
    import faulthandler

    global _open_report
    if os.environ.get(ENABLED_ENV) == "0":
        return
    _open_report = open(report_path(os.getpid()), "w")  # noqa: SIM115 (faulthandler writes to it at the crash)
    faulthandler.enable(_open_report, all_threads=False)


def remove(pid: int) -> None:
    try:
        os.remove(report_path(pid))
    except OSError:
        pass


def read(pid: int | None) -> str | None:
    """The fatal error of engine ``pid`` in a few words (``Segmentation fault, in _wait
    (mpi.py:266)``), or None when it left no report on this host."""
    if pid is None:
        return None
    try:
        with open(report_path(pid), errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines()]
    fatal = next((line for line in lines if line.startswith("Fatal Python error:")), None)
    if fatal is None:
        return None
    what = fatal.removeprefix("Fatal Python error:").strip()
    # faulthandler's frames: 'File "/path/x.py", line 3 in f', innermost first
    frame = next((line for line in lines if line.startswith('File "')), None)
    if frame is not None:
        path, _, rest = frame.removeprefix('File "').partition('", line ')
        line_number, _, function = rest.partition(" in ")
        what += f", in {function} ({os.path.basename(path)}:{line_number})"
    return what
