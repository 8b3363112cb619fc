"""Which transport mpbook's collectives use between engines, decided before anything starts.

- ``nccl`` between GPU engines (the process group's backend).
- ``mpi`` between CPU engines when MPI can start them: ipyparallel's own MPI launcher runs the
  engines under ``mpiexec``, so they share one MPI world, and mpbook's collectives go over
  MPICH's shared memory (:mod:`mpbook.parallel.mpi`), microseconds per all-reduce instead of
  gloo's millisecond. mpi4py and MPICH come from PyPI with mpbook (the ``mpich`` wheel puts
  its launchers beside the Python that runs the kernel).
- ``gloo`` otherwise: no MPI here, or asked for (``transport="gloo"``).

``auto`` picks ``mpi`` for CPU engines when it can and says in one line why not when it
cannot (MPI missing, or mpiexec's engines stopped at start twice); asking for ``mpi`` where it
cannot start is an error that says what is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from ..errors import MpbookError

TRANSPORTS = ("auto", "mpi", "gloo")


@dataclass(frozen=True)
class TransportChoice:
    name: str  # "mpi", "gloo" or "nccl"
    note: str = ""  # why not MPI, when auto fell back to gloo
    mpiexec: str = ""
    # MPI by choice ("auto"): a cluster whose MPI start fails twice comes up over gloo instead
    may_fall_back: bool = False


def mpiexec_path() -> str | None:
    """MPICH's single-host launcher, ``mpiexec.gforker``, beside this Python (the ``mpich``
    wheel's) or on PATH.

    gforker forks the engines and hands each its process-manager connection over an inherited
    socket: nothing listens on the network. MPICH's default launcher (Hydra, ``mpiexec``)
    listens on a TCP port on every interface for as long as the engines run, and sends the
    environment to whatever connects there as one of its proxies. The full path, since a
    kernel started without its environment activated would not find the wheel's on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec.gforker")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec.gforker")


def mpi_missing() -> str | None:
    """Why MPI cannot start engines here, or None when it can."""
    try:
        import mpi4py  # noqa: F401  (the package alone: MPI starts only with mpi4py.MPI)
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if mpiexec_path() is None:
        return "no mpiexec.gforker beside this Python or on PATH (pip install mpich)"
    return None


def choose_transport(transport: str, *, use_gpu: bool) -> TransportChoice:
    if transport not in TRANSPORTS:
        raise MpbookError(f"transport={transport!r}: choose one of {', '.join(TRANSPORTS)}")
    if use_gpu:
        if transport == "mpi":
            raise MpbookError("transport='mpi' is for CPU engines; GPU engines use NCCL (leave out transport)")
        return TransportChoice("nccl")
    if transport == "gloo":
        return TransportChoice("gloo")
    missing = mpi_missing()
    if missing is None:
        return TransportChoice("mpi", mpiexec=mpiexec_path() or "", may_fall_back=transport == "auto")
    if transport == "mpi":
        raise MpbookError(f"transport='mpi': {missing}; or use transport='gloo'")
    return TransportChoice("gloo", note=f"MPI unavailable ({missing}): collectives over gloo, ~1 ms each")


def configure_mpi_engines(config, choice: TransportChoice, engine_cmd: list[str], environment: dict[str, str]) -> None:
    """ipyparallel's MPI engine launcher: ``mpiexec.gforker -n N`` of mpbook's engine command.

    Neither the launcher nor the ranks listen on any interface: gforker talks to the ranks
    over inherited sockets, and the ranks use only MPICH's shared memory."""
    from ..parallel.mpi import LOCAL_ONLY_ENV

    config.MPIEngineSetLauncher.mpi_cmd = [choice.mpiexec]
    config.MPIEngineSetLauncher.mpi_args = []
    config.MPIEngineSetLauncher.engine_cmd = engine_cmd
    config.MPIEngineSetLauncher.environment = {**environment, **LOCAL_ONLY_ENV, **GFORKER_TEXT_ENV}


# gforker forwards each rank's output a byte at a time through a signed char, and takes
# `fputc(c) != c` for a byte over 0x7f as a failed write: it stops reading that rank's output
# for good, and once the pipe's 64 KiB are full the engine blocks in its next write (its log
# line for every request), so one "é" in a warning would later hang the engine. What Python
# writes there (logging, warnings, tracebacks) goes out as ASCII, escaped; a library writing
# raw bytes to the descriptors itself is not covered.
GFORKER_TEXT_ENV = {"PYTHONIOENCODING": "ascii:backslashreplace"}


def attached_transport(client, engine_ids: list[int], transport: str, *, use_gpu: bool) -> TransportChoice:
    """The transport for engines mpbook did not start: MPI when they are exactly one MPI world
    (ipyparallel's MPI launcher, ``ipcluster start --engines mpi``), else the backend."""
    from ..parallel.mpi import in_mpi_world

    if transport not in TRANSPORTS:
        raise MpbookError(f"transport={transport!r}: choose one of {', '.join(TRANSPORTS)}")
    if use_gpu:
        return choose_transport("gloo" if transport == "auto" else transport, use_gpu=True)
    if transport == "gloo":
        return TransportChoice("gloo")
    worlds = client[engine_ids].apply_sync(in_mpi_world)
    n = len(engine_ids)
    one_world = all(w is not None and w[1] == n for w in worlds) and sorted(w[0] for w in worlds) == list(range(n))
    if one_world:
        return TransportChoice("mpi")
    why = ("the engines were not started by mpiexec" if all(w is None for w in worlds)
           else f"the {n} engines are not exactly one MPI world ({worlds})")
    if transport == "mpi":
        raise MpbookError(f"transport='mpi': {why}; start them with `ipcluster start --engines mpi -n {n}`, "
                          "or use transport='gloo'")
    return TransportChoice("gloo", note=f"no MPI world ({why}): collectives over gloo")


MPICH_SHARED_MEMORY = "/dev/shm/mpich_shm_"


def mpi_shared_memory_files(pids) -> set[str]:
    """The shared-memory files MPICH made for these processes' MPI world (one per world, mapped
    by every rank). MPICH removes it in ``MPI_Finalize``, which an engine never reaches (it
    exits without finalizing: a world whose peers are gone could wait there), and the name
    must stay while the world runs (a rank that unlinked it broke the next collective). Left
    behind, it is more than lost memory: its name is the world's id (MPICH derives it from
    the launcher's job, and pids come round), and a later world that comes to the same name
    opens the stale file instead of a fresh one. So an engine removes it on its way out, and
    the cluster's stop once the engines are gone (for those that were killed)."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                found.update(word for line in maps for word in line.split() if word.startswith(MPICH_SHARED_MEMORY))
        except OSError:  # gone already, or not Linux
            pass
    return found


def remove_files(paths) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:  # removed already (another rank of the world, or the stop)
            pass
