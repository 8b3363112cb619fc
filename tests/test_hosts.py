"""Engines on several hosts, started by mpbook over SSH: two hosts made on this machine
(tests/hosts.py: network namespaces on 192.0.2.0/24, a hostname and an sshd each), the
notebook's side on the first (tests/hosts_driver.py).

Marked ``hosts`` (and ``cluster``); skipped, with the reason, where hosts cannot be made
(not root, no ``ip``, no ``sshd``).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from hosts import Hosts, listening_ports

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def two_hosts():
    missing = Hosts.missing()
    if missing:
        pytest.skip(f"cannot make hosts on this machine: {missing}")
    with Hosts.made(["hosta", "hostb"]) as hosts:
        yield hosts
    assert not hosts.namespaces(), f"namespaces left behind: {hosts.namespaces()}"


@pytest.fixture(scope="module")
def across_hosts(two_hosts):
    """What the notebook on host a saw, driving 2 + 2 engines on hosts a and b."""
    far_link = two_hosts.links[1][1]  # host b's port on the bridge, in host a's namespace
    done = two_hosts.run("hosta", [sys.executable, os.path.join(HERE, "hosts_driver.py"), "hosta:2,hostb:2", "hostb",
                                   far_link], DRIVER_TIMEOUT_S, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, f"the driver failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    seen["interfaces"] = {name: host.device for name, host in two_hosts.hosts.items()}
    print(json.dumps(seen, indent=1))  # the figures, for the record (-s shows them)
    return seen


pytestmark = [pytest.mark.hosts, pytest.mark.cluster]


def test_engines_on_two_hosts(two_hosts, across_hosts):
    """One test for the one cluster (pytest-xdist would otherwise make the hosts and start the
    cluster once per worker): every check below runs, and all failures are reported together."""
    checks = [check_ranks_follow_the_hosts_and_status_groups_them,
              check_every_strategy_gives_one_devices_tokens_across_hosts,
              check_tensor_groups_stay_inside_a_host_and_a_spanning_one_is_warned_of,
              check_only_the_shared_address_is_listened_on,
              check_the_links_between_every_pair_are_measured_and_summarised_in_status,
              check_an_interrupt_ends_the_cell_within_3_s_and_the_next_cell_runs,
              check_an_engine_killed_on_the_far_host_is_named_and_restart_brings_the_layout_back,
              check_a_host_whose_link_goes_down_is_reported_within_the_timeout,
              check_the_mpi_launcher_starts_one_mpi_world_across_the_hosts]
    failed = []
    for check in checks:
        try:
            check(across_hosts)
        except AssertionError as exc:
            failed.append(f"{check.__name__}: {exc}")
    try:
        check_stop_leaves_no_process_socket_or_file_behind(two_hosts, across_hosts)
    except AssertionError as exc:
        failed.append(f"check_stop_leaves_no_process_socket_or_file_behind: {exc}")
    assert not failed, "\n".join(failed)


def check_ranks_follow_the_hosts_and_status_groups_them(across_hosts):
    assert across_hosts["hosts_by_rank"] == ["hosta", "hosta", "hostb", "hostb"]
    assert across_hosts["engine_hosts"] == across_hosts["hosts_by_rank"]
    table = across_hosts["table"].splitlines()
    assert table[1] == "hosta: 2 engines, ranks 0-1" and table[4] == "hostb: 2 engines, ranks 2-3"


def check_every_strategy_gives_one_devices_tokens_across_hosts(across_hosts):
    runs = across_hosts["runs"]
    assert set(runs) == {"data {}", "pipeline {}", "tensor {}", "tensor {'pp': 2}", "pipeline {'ep': 2}"}
    for name, run in runs.items():
        assert run["same_tokens"], f"{name} ({run['layout']}) differs from one device"


def check_tensor_groups_stay_inside_a_host_and_a_spanning_one_is_warned_of(across_hosts):
    runs = across_hosts["runs"]
    for name in ("tensor {'pp': 2}", "pipeline {'ep': 2}"):
        assert all(len(hosts) == 1 for hosts in runs[name]["tp_groups_hosts"]), runs[name]
        assert runs[name]["warning"] == ""
    spanning = runs["tensor {}"]  # tp=4 over 2 + 2 engines
    assert spanning["tp_groups_hosts"] == [["hosta", "hostb"]]
    assert spanning["warning"].startswith("warning: dp=1 x pp=1 x tp=4: the tp group of ranks [0, 1, 2, 3] spans hosts")
    assert len(spanning["warning"].splitlines()) == 1


def check_only_the_shared_address_is_listened_on(across_hosts):
    """Nothing on every interface (0.0.0.0, ::) and nothing on another address: the
    controller, the rendezvous store and gloo listen on the address the hosts share (and
    ipyparallel's and ipykernel's own internal channels on loopback, which no other host reaches)."""
    loopback = {"127.0.0.1", "::1"}
    assert across_hosts["address"] == "192.0.2.1"
    assert set(across_hosts["controller_listen"]) - loopback == {"192.0.2.1"}
    for rank, seen in enumerate(across_hosts["engines_network"]):
        mine = "192.0.2.1" if rank < 2 else "192.0.2.2"
        assert set(seen["listen"]) - loopback == {mine}, (rank, seen)  # gloo's listeners (and rank 0's store)
        # gloo keeps to the interface of the route between the hosts
        assert seen["ifname"] == across_hosts["interfaces"][across_hosts["hosts_by_rank"][rank]], (rank, seen)


def check_the_links_between_every_pair_are_measured_and_summarised_in_status(across_hosts):
    links = across_hosts["links"]
    assert [(low, high) for low, high, *_ in links] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    hosts = across_hosts["hosts_by_rank"]
    for low, high, low_host, high_host, latency_s, bandwidth in links:
        assert (low_host, high_host) == (hosts[low], hosts[high])
        assert 0 < latency_s < 1 and bandwidth > 0
    summary = across_hosts["status_table"].splitlines()[-1]
    assert summary.startswith("links (median): within a host ") and "(2 pairs); across hosts " in summary
    assert summary.endswith("(4 pairs)")


def check_an_interrupt_ends_the_cell_within_3_s_and_the_next_cell_runs(across_hosts):
    for name, seen in across_hosts["interrupts"].items():
        assert seen["outcome"] == "interrupted", (name, seen)
        assert seen["interrupt_to_end_s"] < 3.0, (name, seen)
        assert seen["next_cell_s"] < 15.0, (name, seen)
        assert seen["next_same_tokens"], (name, seen)


def check_an_engine_killed_on_the_far_host_is_named_and_restart_brings_the_layout_back(across_hosts):
    kill = across_hosts["kill"]
    assert kill["error"] == "EngineDiedError", kill
    assert f"rank {kill['far_rank']} on hostb died" in kill["message"], kill  # named with its host
    assert kill["named_after_s"] < 30.0, kill
    assert kill["after_restart_same_tokens"], kill
    assert kill["hosts_after_restart"] == ["hosta", "hosta", "hostb", "hostb"]


def check_a_host_whose_link_goes_down_is_reported_within_the_timeout(across_hosts):
    link = across_hosts["link"]
    assert link["error"] != "none", link
    assert link["reported_after_s"] < across_hosts["timeout_s"] + 10, link


def check_the_mpi_launcher_starts_one_mpi_world_across_the_hosts(across_hosts):
    mpi = across_hosts["mpi"]
    assert mpi["hosts_by_rank"] == ["hosta", "hostb"] and mpi["transports"] == ["mpi", "mpi"]
    for strategy in ("tensor", "pipeline"):
        assert mpi[strategy] == {"same_tokens": True, "used": ["mpi"]}, (strategy, mpi[strategy])


def check_stop_leaves_no_process_socket_or_file_behind(two_hosts, across_hosts):
    assert across_hosts["stop_s"] < 60
    # each engine's output file and the connection files sent to the hosts, removed there
    assert any("/log/ipengine" in path for path in across_hosts["remote_files"]), across_hosts["remote_files"]
    assert across_hosts["remote_files_left"] == []
    # no crash report in the hosts' temp folder either (an engine on host b was killed): an
    # engine started over ssh gets no folder of reports and writes none
    reports = [path for pid in across_hosts["engine_pids"]
               for path in glob.glob(f"/tmp/mpbook-crash-reports-*/engine-{pid}.crash")]
    assert not reports, reports
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in two_hosts.processes()
            if p.pid not in {h.sshd.pid for h in two_hosts.hosts.values()}]
    assert not left, f"processes left on the hosts: {left}"
    for host in two_hosts.hosts.values():
        assert listening_ports(host.sshd.pid) == {22}, (host.name, listening_ports(host.sshd.pid))
