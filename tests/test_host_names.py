"""Engines that report different hosts, made in seconds: each engine runs in a UTS namespace of
its own (``unshare --uts``) with its own hostname, on this machine's network, and mpbook
attaches to them as to any cluster started outside it. mpbook knows an engine's host only by
the name the engine reports, so everything it does by host (ranks grouped by host, the engines
table, the dashboard, the plots, the planner, the errors that name a dead engine) runs as with
engines on other machines; what needs a real network between hosts (ssh, the listening
addresses, a link going down) is `tests/test_hosts.py`'s, with network namespaces (2 minutes).

The rendezvous is a file (the hosts share this machine's disk): a TCP store would be served at
rank 0's host name, which resolves nowhere here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mpbook import Workbench

pytestmark = pytest.mark.cluster

PROFILE, CLUSTER_ID = "host-names", "named"
HOSTS = ("hosta", "hostb", "hosta")  # started in this order: ranks still group by host
# The engine's own process takes the name, then becomes the engine (same pid, same namespace).
AS_HOST = (
    "import os, socket, sys\n"
    "socket.sethostname(sys.argv[1])\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ipyparallel.engine', *sys.argv[2:]])\n"
)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "a UTS namespace with its own hostname needs root"
    if shutil.which("unshare") is None:
        return "no `unshare` command (util-linux)"
    return None


def _end(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def named_hosts():
    """A controller on loopback and one engine per name in HOSTS, each in its own UTS namespace;
    every process is recorded by pid and ended by pid."""
    why = _why_not()
    if why:
        pytest.skip(why)
    subprocess.run([sys.executable, "-m", "IPython", "profile", "create", PROFILE, "--parallel"], check=True,
                   capture_output=True)
    ids = [f"--profile={PROFILE}", f"--cluster-id={CLUSTER_ID}"]
    started = [subprocess.Popen([sys.executable, "-m", "ipyparallel.controller", *ids, "--ip=127.0.0.1",
                                 "--HeartMonitor.period=250"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for host in HOSTS:
            started.append(subprocess.Popen(["unshare", "--uts", sys.executable, "-c", AS_HOST, host, *ids],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
        yield started
    finally:
        procs = []
        for popen in started:
            try:
                proc = psutil.Process(popen.pid)
                procs += [proc, *proc.children(recursive=True)]  # an engine's nanny
            except psutil.NoSuchProcess:
                pass
        _end(procs)


@pytest.fixture(scope="module")
def across(named_hosts):
    wb = Workbench.attach(profile=PROFILE, cluster_id=CLUSTER_ID, n=len(HOSTS), cpu=True, wait_s=90,
                          rendezvous="file")
    yield wb
    wb.stop()


def test_the_engines_report_their_own_hosts_and_ranks_follow_them(across):
    hosts = [e.host for e in across.engines]
    assert sorted(hosts) == sorted(HOSTS)
    assert hosts == sorted(hosts, key=hosts.index)  # grouped: each host's ranks together
    table = across.table()
    assert "hosta: 2 engines, ranks" in table and "hostb: 1 engine, rank" in table


# ------------------------------------------------------------------ the last test: it kills an engine
def test_an_engine_that_dies_is_named_with_its_host(across):
    from mpbook.errors import EngineDiedError

    # The last rank: rank 0 holds the rendezvous folder, which it removes on its way out.
    far = across.engines[-1]
    began = time.monotonic()
    with pytest.raises(EngineDiedError) as info:
        across.run("import os, signal, time\n"
                   f"if rank == {far.rank}: os.kill(os.getpid(), signal.SIGKILL)\n"
                   "time.sleep(30)\n", stream=False)
    took = time.monotonic() - began
    print(f"\nrank {far.rank} on {far.host} killed itself: named in {took:.2f} s: {info.value}")
    assert f"rank {far.rank} on {far.host} died while running the cell" in str(info.value)
    assert info.value.failures[0].evalue == f"the engine on {far.host} died"
    assert took < 30
    with pytest.raises(EngineDiedError, match=rf"rank {far.rank} on {far.host} has died; run `%mp restart`"):
        across.run("pass")
