"""Attaching to a cluster that was started outside mpbook (`ipcluster start`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cluster_probe import alive
from mpbook import Workbench


@pytest.fixture(scope="module")
def ipcluster():
    """`ipcluster start` in a subprocess: 2 engines, profile 'attached', on loopback."""
    # A cluster id of this test process's own: worksteal may run some of these tests on
    # another worker at the same time, with an ipcluster of its own.
    profile, cluster_id = "attached", f"outside-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "IPython", "profile", "create", profile, "--parallel"], check=True,
                   capture_output=True)
    cmd = [sys.executable, "-m", "ipyparallel.cluster", "start", "-n", "2", f"--profile={profile}",
           f"--cluster-id={cluster_id}", "--ip=127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield proc, profile, cluster_id
    # Ctrl-C, as in the terminal it was started from: ipcluster stops its engines and controller
    # and exits (`ipcluster stop` does the same through a second process, seconds slower).
    started = psutil.Process(proc.pid).children(recursive=True)  # controller, engines, their nannies
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    _, left = psutil.wait_procs(started, timeout=30)
    assert not left, f"ipcluster left {left} running"


@pytest.mark.parametrize("rendezvous", [None, "tcp"])
def test_attach_forms_a_group_and_leaves_the_cluster_running(ipcluster, rendezvous):
    proc, profile, cluster_id = ipcluster
    wb = Workbench.attach(profile=profile, cluster_id=cluster_id, n=2, cpu=True, wait_s=60, rendezvous=rendezvous)
    try:
        assert not wb.owned and wb.world_size == 2
        assert wb.cluster.rendezvous_kind == (rendezvous or "file")  # one host: a file store, nothing listening
        engine_pids = [e.pid for e in wb.engines]

        def reduce(state):
            import torch
            import torch.distributed as dist

            t = torch.tensor([state.rank + 1.0])
            dist.all_reduce(t)
            return t.item()

        assert wb.apply(reduce) == [3.0, 3.0]
        assert wb.pids() == {"controller": [], "engines": []}  # mpbook started none of them
    finally:
        wb.stop()
    # nothing that mpbook did not start was stopped
    time.sleep(0.5)
    assert proc.poll() is None
    assert alive(engine_pids) == engine_pids


def test_attach_then_restart_reforms_the_group_on_the_same_engines(ipcluster):
    _, profile, cluster_id = ipcluster
    with Workbench.attach(profile=profile, cluster_id=cluster_id, n=2, cpu=True, wait_s=60) as wb:
        pids = [e.pid for e in wb.engines]
        first = rendezvous_folder(wb)
        wb.restart()
        assert [e.pid for e in wb.engines] == pids
        wb.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")
        # the engines stay up: the group's rendezvous folders go once every rank has left it
        second = rendezvous_folder(wb)
        assert second != first and os.path.isdir(second) and not os.path.exists(first)
    assert not os.path.exists(second)


def rendezvous_folder(wb) -> str:
    """The folder of rank 0's file rendezvous (engines on one host)."""
    return os.path.dirname(wb.apply(lambda state: state.rendezvous.path, ranks=[0], stream=False)[0])


def test_attach_reads_again_a_connection_file_caught_while_it_is_written(ipcluster, tmp_path):
    """The controller writes its connection file in place: a client that comes just then may
    find it empty. Here the file is there but empty for 1.5 s, then written."""
    import threading

    from IPython.paths import get_ipython_dir

    _, profile, cluster_id = ipcluster
    security = os.path.join(get_ipython_dir(), f"profile_{profile}", "security")
    written = os.path.join(security, f"ipcontroller-{cluster_id}-client.json")
    deadline = time.monotonic() + 60
    while not os.path.exists(written) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # (the running controller's own file, written whole by now)
    with open(written) as f:
        content = f.read()
    being_written = f"{cluster_id}-being-written"
    path = os.path.join(security, f"ipcontroller-{being_written}-client.json")
    open(path, "w").close()
    writer = threading.Timer(1.5, lambda: open(path, "w").write(content))
    writer.start()
    try:
        with Workbench.attach(profile=profile, cluster_id=being_written, n=2, cpu=True, wait_s=60) as wb:
            assert wb.world_size == 2
            wb.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")
    finally:
        writer.join()
        os.remove(path)


def test_attach_to_a_missing_cluster_says_how_to_start_one():
    from mpbook import MpbookError

    with pytest.raises(MpbookError, match="ipcluster start"):
        Workbench.attach(profile="default", cluster_id="never-started", wait_s=1)  # waits 1 s, no more


@pytest.fixture
def mpi_ipcluster():
    """`ipcluster start --engines mpi` in a subprocess: 2 engines in one MPI world (MPICH's
    single-host launcher), as a person starts them outside mpbook."""
    from mpbook.cluster.transport import mpiexec_path
    from mpbook.parallel.mpi import LOCAL_ONLY_ENV

    profile, cluster_id = "attached-mpi", f"outside-mpi-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "IPython", "profile", "create", profile, "--parallel"], check=True,
                   capture_output=True)
    cmd = [sys.executable, "-m", "ipyparallel.cluster", "start", "-n", "2", f"--profile={profile}",
           f"--cluster-id={cluster_id}", "--ip=127.0.0.1", "--engines=mpi",
           f"--MPIEngineSetLauncher.mpi_cmd=['{mpiexec_path()}']"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **LOCAL_ONLY_ENV})
    yield proc, profile, cluster_id
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    _, left = psutil.wait_procs(started, timeout=30)
    assert not left, f"ipcluster left {left} running"


def test_attached_engines_of_one_mpi_world_use_mpi(mpi_ipcluster, tiny_folder):
    from mpbook.reference import reference

    proc, profile, cluster_id = mpi_ipcluster
    wb = Workbench.attach(profile=profile, cluster_id=cluster_id, n=2, cpu=True, wait_s=60)
    try:
        assert {e.transport for e in wb.engines} == {"mpi"} and "collectives: MPI" in wb.table()
        prompts = ["Hello there", "What does an all-reduce do?"]
        result = wb.generate(prompts, strategy="tensor", model=tiny_folder, max_new_tokens=5)
        assert result.token_ids == reference(tiny_folder, prompts, max_new_tokens=5)[1]
        assert {t for r in result.transports for t in r.values()} == {"mpi"}
    finally:
        wb.stop()
    assert proc.poll() is None  # left running
