"""A local cluster is reachable from this host only, and only by who holds its key.

Checked on the sockets the processes really hold (psutil), after a collective has run, so
that gloo's own listener is among them.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import stat

import psutil
import pytest

from cluster_probe import processes, rendezvous_path, sockets
from mpbook.engine import group


def reduce_sum(state):
    import torch
    import torch.distributed as dist

    t = torch.tensor([state.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def roles(wb) -> dict[str, list[psutil.Process]]:
    """The cluster's processes by what they are: controller (and its forks), engines, nannies,
    and (engines started by MPI) the launcher whose children they are."""
    pids = wb.pids()
    controller = psutil.Process(pids["controller"][0])
    engines = [psutil.Process(e.pid) for e in wb.engines]
    launched = [psutil.Process(pid) for pid in pids["engines"] if pid not in {e.pid for e in wb.engines}]
    return {
        "controller": [controller, *controller.children(recursive=True)],
        "engine": engines,
        "nanny": [child for e in engines for child in e.children(recursive=True)],
        "launcher": launched,
    }


def listening(procs) -> set[tuple[str, int]]:
    return {(ip, port) for _, ip, port, _ in sockets(procs, status=psutil.CONN_LISTEN)}


def test_every_socket_of_the_cluster_is_on_loopback_after_a_collective(workbench):
    assert workbench.apply(reduce_sum, stream=False) == [3.0, 3.0]
    by_role = roles(workbench)
    assert len(by_role["engine"]) == 2 and len(by_role["nanny"]) == 2
    # Engines started by MPI (the shared workbench, when mpi4py is installed): MPICH's
    # single-host launcher talks to them over inherited sockets and listens on nothing.
    launcher = by_role.pop("launcher")
    if {e.transport for e in workbench.engines} == {"mpi"}:
        assert [p.name() for p in launcher] == ["mpiexec.gforker"]
        assert listening(launcher) == set()
    for role, procs in by_role.items():
        found = listening(procs)
        assert found, f"no listening socket found for the {role}: the check would prove nothing"
        outside = sorted(addr for addr in found if not is_loopback(addr[0]))
        assert outside == [], f"the {role} listens beyond loopback: {outside}"
    # and no connection, made or accepted, reaches beyond this host
    for pid, local, port, remote in sockets(processes(workbench)):
        assert is_loopback(local) and (not remote or is_loopback(remote)), (pid, local, port, remote)


def test_gloo_listens_on_loopback(workbench):
    # Fresh engines: gloo's listener belongs to a device every group of the process shares, and
    # a group an earlier test left behind (interrupted, rebuilt) would keep it open.
    workbench.restart()
    assert workbench.apply(reduce_sum, stream=False) == [3.0, 3.0]
    engines = roles(workbench)["engine"]
    with_group = {p.pid: listening([p]) for p in engines}
    try:
        workbench.apply(group.teardown, stream=False)  # leave the process group: gloo closes its listener
        gloo = {p.pid: with_group[p.pid] - listening([p]) for p in engines}
    finally:
        workbench.cluster.rebuild_group()
    for pid, addrs in gloo.items():
        assert addrs, f"engine {pid}: no socket closed with the process group, so none was gloo's"
        assert all(is_loopback(ip) for ip, _ in addrs), f"engine {pid}: gloo listens on {addrs}"


def test_rendezvous_is_a_private_file_and_nothing_listens_for_it(workbench):
    path = rendezvous_path(workbench)
    assert path, "a local cluster meets through a file, not a TCP store"
    folder = os.stat(os.path.dirname(path))
    assert folder.st_uid == os.getuid()
    assert stat.S_IMODE(folder.st_mode) == 0o700


def test_messages_are_signed_and_a_forged_key_gets_no_answer(workbench, tmp_path):
    import ipyparallel as ipp

    session = workbench.client.session
    assert session.key and session.signature_scheme.startswith("hmac-")

    def engine_key():
        from ipykernel.kernelbase import Kernel

        return Kernel.instance().session.key

    assert workbench.client[workbench.engine_ids()].apply_sync(engine_key) == [session.key] * 2
    # the files that hold the key are readable by this user only
    security = os.path.join(workbench.cluster.ipp_cluster.profile_dir, "security")
    keyed = [f for f in glob.glob(os.path.join(security, "*.json")) if json.load(open(f)).get("key")]
    assert keyed
    for f in keyed:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    # a client that knows every address but not the key is ignored by the controller
    client_file = next(f for f in keyed if f.endswith("-client.json"))
    forged = dict(json.load(open(client_file)), key="0" * len(session.key))
    path = tmp_path / "forged-client.json"
    path.write_text(json.dumps(forged))
    with pytest.raises(TimeoutError):
        ipp.Client(str(path), timeout=2)
