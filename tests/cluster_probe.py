"""What a running cluster holds on this host: its processes, their sockets, its rendezvous.

Used by the reliability, security and kernel tests, and importable inside a Jupyter kernel
that a test drives (the tests folder is on PYTHONPATH), so the kernel can report its own
cluster and the test can check, after the kernel is gone, that all of it is gone too. Also
the shared workbench under a shorter collective timeout, for the tests that wait for one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings

import psutil


def processes(wb) -> list[psutil.Process]:
    """Every process the workbench started: controller (and its forks), engines, nannies."""
    from mpbook.cluster.lifecycle import process_trees

    return process_trees(wb.pids())


def process_tree(wb) -> list[int]:
    """The pids of :func:`processes`."""
    return [p.pid for p in processes(wb)]


def sockets(procs, *, status: str | None = None) -> list[tuple[int, str, int, str]]:
    """(pid, local ip, local port, remote ip or "") of each inet socket of ``procs``."""
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if status is None or c.status == status:
                found.append((proc.pid, c.laddr.ip, c.laddr.port, c.raddr.ip if c.raddr else ""))
    return found


def rendezvous_path(wb) -> str:
    """Rank 0's rendezvous file (a FileStore) for a local cluster."""

    def where(state):
        return state.rendezvous.path if state.rendezvous and state.rendezvous.kind == "file" else ""

    return wb.apply(where, ranks=[0], stream=False)[0]


def snapshot(wb) -> dict:
    """A JSON-able record of the cluster, for a test to check once the cluster should be gone."""
    procs = processes(wb)
    return {
        "pids": [p.pid for p in procs],
        "engine_pids": [e.pid for e in wb.engines],
        "listening": sorted({port for _, _, port, _ in sockets(procs, status=psutil.CONN_LISTEN)}),
        "rendezvous_dir": os.path.dirname(rendezvous_path(wb)),
    }


def alive(pids) -> list[int]:
    """PIDs that still run (zombies, dead but not yet reaped, do not count)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def still_listening(ports, pids) -> list[tuple[int | None, int]]:
    """(pid, port) of LISTEN sockets on ``ports`` held by one of ``pids`` or by a process we may not see."""
    ports, pids = set(ports), set(pids)
    return [
        (c.pid, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and (c.pid is None or c.pid in pids)
    ]


def gone_within(snap: dict, timeout_s: float) -> tuple[list[int], list]:
    """Wait (polling, with a deadline) for every process and listening port of ``snap`` to go.

    Returns what is left: (pids alive, (pid, port) still listening); both empty on success.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        left = alive(snap["pids"]), still_listening(snap["listening"], snap["pids"])
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@contextlib.contextmanager
def collective_timeout(wb, seconds: float):
    """``wb`` with collectives that give up after ``seconds`` (the group formed again with it),
    then with its own timeout again.

    Should an engine not come back to form the group again afterwards, the engines' stacks
    say where each one is, as a warning in the session's summary, and the workbench is
    restarted: the test that ran has passed or failed on its own, and the next one gets the
    workbench whole."""
    from mpbook import MpbookError

    before = wb.timeout_s
    wb.cluster.timeout_s = seconds
    wb.cluster.rebuild_group()
    try:
        yield wb
    finally:
        wb.cluster.timeout_s = before
        if not wb.stopped:
            try:
                wb.cluster.rebuild_group()
            except MpbookError as err:
                warnings.warn(f"{err}; where each engine was:\n{engine_stacks(wb)}\nthe workbench was restarted",
                              stacklevel=1)
                wb.restart()


def engine_stacks(wb) -> str:
    """Every thread's Python and native stack in each engine of ``wb`` (py-spy)."""
    stacks = []
    for info in wb.cluster.engines:
        dump = subprocess.run(["py-spy", "dump", "--native", "--pid", str(info.pid)], capture_output=True, text=True,
                              timeout=60)
        stacks.append(f"rank {info.rank} (pid {info.pid}):\n{dump.stdout}{dump.stderr}")
    return "\n".join(stacks)
