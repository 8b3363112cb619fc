"""Entry point for the controller and engine processes of a cluster that mpbook starts.

``python -m mpbook.cluster.launch engine|controller [ipyparallel args...]`` runs ipyparallel's own
engine or controller, with these additions:

- an owner watch: when the process that started the cluster (a notebook kernel) dies without
  stopping it, for example killed by the OS, the controller and engines end themselves
  instead of holding GPUs as orphans;
- a parent watch in forked children: the controller forks its heart monitor, which has
  no watch of its own (threads do not survive a fork) and would outlive a controller that
  was killed;
- on engines, ``import torch`` starts in a background thread at once, so its second of
  import time overlaps the engine's registration with the controller; and an engine that
  has stopped exits without interpreter finalization, which costs a second with torch loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

from mpbook.cluster import crash_report

OWNER_ENV = "MPBOOK_OWNER_PID"


def _watch_owner(owner_pid: int, role: str, period_s: float = 0.5, grace_s: float = 3.0) -> None:
    import psutil

    try:
        owner = psutil.Process(owner_pid)
    except psutil.NoSuchProcess:
        owner = None
    try:
        while owner is not None and owner.is_running() and owner.status() != psutil.STATUS_ZOMBIE:
            time.sleep(period_s)
    except psutil.NoSuchProcess:
        pass
    if role == "engine":
        # An engine runs ipyparallel's stop only between cells: interrupt a running one first.
        os.kill(os.getpid(), signal.SIGINT)
    # SIGTERM runs ipyparallel's own shutdown path (the engine stops its nanny).
    os.kill(os.getpid(), signal.SIGTERM)
    # A cell stuck in C code (a collective waiting for its timeout) ignores both.
    time.sleep(grace_s)
    crash_report.remove_own()  # ending by choice, not by a crash
    os._exit(1)


def _watch_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """In a forked child: end when the parent is gone (the child is then re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(period_s)
    os._exit(0)


def _after_fork_in_child(parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="mpbook-parent-watch").start()


def _warm_import() -> None:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401


def main(argv: list[str]) -> None:
    role, rest = (argv[0] if argv else ""), argv[1:]
    owner = os.environ.get(OWNER_ENV)
    if owner:
        threading.Thread(target=_watch_owner, args=(int(owner), role), daemon=True, name="mpbook-owner-watch").start()
    if hasattr(os, "register_at_fork"):
        parent = os.getpid()
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(parent))
    sys.argv = [f"mpbook-{role}", *rest]
    if role == "engine":
        threading.Thread(target=_warm_import, daemon=True, name="mpbook-warm-import").start()
        crash_report.enable()  # a fatal signal's report, for the client to read if this engine dies
        run = run_engine
    elif role == "controller":
        from ipyparallel.controller.app import main as run
    else:
        raise SystemExit(f"usage: python -m mpbook.cluster.launch engine|controller [args]; got {role!r}")
    if role != "engine":
        run()
        return
    code = 0
    try:
        run()
    except BaseException:
        # ipyparallel ends a stopped engine with "Event loop stopped before Future completed"
        traceback.print_exc()
        code = 1
    try:
        from mpbook.engine.rendezvous import remove_rendezvous

        remove_rendezvous()
    except Exception:
        traceback.print_exc()
    try:
        from mpbook.cluster.transport import mpi_shared_memory_files, remove_files

        remove_files(mpi_shared_memory_files([os.getpid()]))  # MPICH's, which only MPI_Finalize removes
    except Exception:
        traceback.print_exc()
    crash_report.remove_own()  # ended normally: nothing to report (it raises nothing)
    # With torch loaded, interpreter finalization costs a second of CPU per engine and does
    # nothing that a process about to end needs: the engine has stopped its kernel, and its
    # nanny tells the controller. Skipping it makes stop and restart that much faster.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_engine() -> None:
    """ipyparallel's engine; returns normally when it was asked to stop (SIGTERM)."""
    from mpbook.compat.ipyparallel import engine_class

    Engine = engine_class()
    try:
        Engine.launch_instance()
    except RuntimeError:
        # With ipykernel 7, a SIGTERM'd engine (ipyparallel 9.2) stops its event loop before
        # its start future completes, and tornado raises "Event loop stopped before Future
        # completed". Exiting with status 1 for it makes ipyparallel's Cluster log the
        # engine's whole output as a warning, which lands in the notebook on every `%mp stop`.
        # A stop that was asked for is a clean exit.
        if not Engine.stopping:
            raise


if __name__ == "__main__":
    main(sys.argv[1:])
