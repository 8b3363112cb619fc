"""Entry point for the controller and engine processes of a cluster that mpbook starts.

``python -m mpbook._launch engine|controller [ipyparallel args...]`` runs ipyparallel's own
engine or controller, with two additions:

- an owner watch: when the process that started the cluster (a notebook kernel) dies without
  stopping it, for example killed by the OS, the controller and engines end themselves
  instead of holding GPUs as orphans;
- on engines, ``import torch`` starts in a background thread at once, so its second of
  import time overlaps the engine's registration with the controller.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

OWNER_ENV = "MPBOOK_OWNER_PID"


def _watch_owner(owner_pid: int, period_s: float = 1.0) -> None:
    import psutil

    try:
        owner = psutil.Process(owner_pid)
    except psutil.NoSuchProcess:
        owner = None
    while owner is not None and owner.is_running() and owner.status() != psutil.STATUS_ZOMBIE:
        time.sleep(period_s)
    # SIGTERM runs ipyparallel's own shutdown path (the engine stops its nanny).
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)


def _warm_import() -> None:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401


def main(argv: list[str]) -> None:
    role, rest = argv[0], argv[1:]
    owner = os.environ.get(OWNER_ENV)
    if owner:
        threading.Thread(target=_watch_owner, args=(int(owner),), daemon=True, name="mpbook-owner-watch").start()
    sys.argv = [f"mpbook-{role}", *rest]
    if role == "engine":
        threading.Thread(target=_warm_import, daemon=True, name="mpbook-warm-import").start()
        run = run_engine
    elif role == "controller":
        from ipyparallel.controller.app import main as run
    else:
        raise SystemExit(f"usage: python -m mpbook._launch engine|controller [args]; got {role!r}")
    run()


def run_engine() -> None:
    """ipyparallel's engine; returns normally when it was asked to stop (SIGTERM)."""
    from ipyparallel.engine.app import IPEngine

    class Engine(IPEngine):
        stopping = False

        def _signal_stop(self, sig, frame):
            Engine.stopping = True
            super()._signal_stop(sig, frame)

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
