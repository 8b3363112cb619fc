"""What an engine that crashed said last: Python's fatal-error report, read by the client.

An engine that dies of a signal (a segfault or heap corruption in a library, an abort in C++
code) leaves no traceback in the notebook, and its log goes with the stop. So each engine a
cluster started by mpbook runs on the client's host has :mod:`faulthandler` write its report
(the fatal signal and the Python stack of the thread it hit) to a file of its own in a folder
of the cluster's (:data:`FOLDER_ENV`, made by the client at the start), and the client,
finding an engine gone, reads that file and names the signal and the innermost frame in the
error (:class:`mpbook.errors.EngineDiedError`). A process killed outright (SIGKILL, the
kernel's out-of-memory killer) writes nothing: the error then says only that it died.

Each engine that ends without crashing removes its own report, and the last one the folder
(a client that died without stopping its cluster removes nothing). The client removes the whole
folder at the stop, so a report left by an engine that could not remove its own (killed
outright) goes with it.
Engines started on other hosts, or by someone else, get no folder and write nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# The folder of a cluster's reports, in the environment of the engines mpbook starts on the
# client's host.
FOLDER_ENV = "MPBOOK_CRASH_REPORTS"

_open_report = None  # the engine's own report file, open for as long as the process lives


def make_folder() -> str:
    """The client's, at a cluster's start: a folder for its engines' reports."""
    return tempfile.mkdtemp(prefix="mpbook-crash-reports-")


def remove_folder(folder: str | None) -> None:
    """The client's, at the stop: every report of the cluster, its engines' own or left."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def report_path(folder: str, pid: int) -> str:
    return os.path.join(folder, f"engine-{pid}.crash")


def enable() -> None:
    """In an engine process: write faulthandler's report of a fatal signal to this engine's
    file, where the cluster gave a folder for it."""
    import faulthandler

    global _open_report
    folder = os.environ.get(FOLDER_ENV)
    if not folder or not os.path.isdir(folder):
        return
    _open_report = open(report_path(folder, os.getpid()), "w")  # noqa: SIM115 (faulthandler writes to it at the crash)
    faulthandler.enable(_open_report, all_threads=False)


def remove_own() -> None:
    """In an engine process that ends without crashing: nothing to report. The last engine to
    leave removes the folder too, for a client that ended without stopping its cluster."""
    folder = os.environ.get(FOLDER_ENV)
    if folder and _open_report is not None:
        for remove, path in ((os.remove, report_path(folder, os.getpid())), (os.rmdir, folder)):
            try:
                remove(path)
            except OSError:  # (the folder: other engines' reports are still in it)
                pass


def read(folder: str | None, pid: int | None) -> str | None:
    """The fatal error of engine ``pid`` in a few words (``Segmentation fault, in _wait
    (mpi.py:266)``), or None when it left no report."""
    if folder is None or pid is None:
        return None
    try:
        with open(report_path(folder, pid), errors="replace") as f:
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
