"""Engines on several hosts, the parts decided before anything starts: the hosts asked for,
ranks by host, groups that would cross hosts, the engines table by host, and what
ipyparallel's MPI and Slurm launchers are given (the Slurm script as ipyparallel writes it;
no Slurm runs here)."""

from __future__ import annotations

import sys

import pytest
from traitlets.config import Config

from mpbook import MpbookError, Workbench
from mpbook.cluster.hosts import HostSlots, check_hosts, controller_address, rank_order, span_warning, spanning_groups
from mpbook.cluster.lifecycle import format_engines
from mpbook.cluster.ssh import configure_engines
from mpbook.layout import Layout
from mpbook.protocol import EngineInfo

SLOTS = (HostSlots("hosta", 2), HostSlots("hostb", 2))


def test_hosts_are_read_in_every_form():
    assert check_hosts("hosta:2,hostb:2") == SLOTS
    assert check_hosts({"hosta": 2, "hostb": 2}) == SLOTS
    assert check_hosts(["hosta", "hostb"]) == (HostSlots("hosta", 1), HostSlots("hostb", 1))
    assert check_hosts("me@hosta:3") == (HostSlots("me@hosta", 3),)
    assert check_hosts("hosta") == (HostSlots("hosta", 1),)


@pytest.mark.parametrize("hosts, words", [
    ("hosta:two", "hosta:two: the count must be a whole number of engines, e.g. hosta:2"),
    ("hosta:0", "hosta:0: a host needs at least one engine; leave the host out instead"),
    ("hosta:2,,hostb:1", "an empty host name; give host:count pairs, e.g. --hosts hosta:2,hostb:2"),
    ("hosta:1,hosta:2", "hosta is named twice"),
    (42, "give host:count pairs as text"),
    ({}, "no hosts given"),
])
def test_bad_hosts_are_refused_with_the_fix(hosts, words):
    with pytest.raises(MpbookError, match=None) as info:
        check_hosts(hosts)
    assert words in str(info.value)


def test_starting_on_hosts_checks_everything_before_starting():
    with pytest.raises(MpbookError, match=r"-n 3 with --hosts asking for 4 engines"):
        Workbench.start(3, hosts="hosta:2,hostb:2")
    with pytest.raises(MpbookError, match=r"--launcher 'pbs': choose one of ssh, mpi, slurm"):
        Workbench.start(hosts="hosta:2", launcher="pbs")
    with pytest.raises(MpbookError, match=r"--transport mpi across hosts needs engines started by mpiexec"):
        Workbench.start(hosts="hosta:2", transport="mpi")
    with pytest.raises(MpbookError, match=r"--ip 192.0.2.77: no interface of this host has that address"):
        Workbench.start(hosts="hosta:2", ip="192.0.2.77")
    with pytest.raises(MpbookError, match=r"--ip is for engines on other hosts"):
        Workbench.start(2, cpu=True, ip="127.0.0.1")


def test_the_controller_address_is_the_given_one_or_loopback_for_this_host():
    assert controller_address(check_hosts("localhost:2")) == "127.0.0.1"
    assert controller_address(SLOTS, ip="127.0.0.1") == "127.0.0.1"
    with pytest.raises(MpbookError, match=r"--ip 'here': give an IP address of this host"):
        controller_address(SLOTS, ip="here")


def test_ranks_are_grouped_by_host_in_the_order_given():
    # engines registered alternately, as SSH-started engines on two hosts come up
    ids, hosts = [0, 1, 2, 3], ["hostb", "hosta", "hostb", "hosta"]
    assert rank_order(ids, hosts, first=["hosta", "hostb"]) == [1, 3, 0, 2]
    assert rank_order(ids, hosts) == [0, 2, 1, 3]  # attached: the host of the lowest id first
    assert rank_order([5, 7], ["h", "h"]) == [5, 7]


def test_tensor_groups_inside_hosts_and_a_warning_when_one_must_cross():
    hosts = ["hosta", "hosta", "hostb", "hostb"]
    assert spanning_groups(Layout(pp=2, tp=2), hosts) == []
    assert spanning_groups(Layout(dp=2, tp=2), hosts) == []
    assert spanning_groups(Layout(pp=2, ep=2), hosts) == []
    assert span_warning(Layout(pp=4), hosts) is None
    assert spanning_groups(Layout(tp=4), hosts) == [("tp", [0, 1, 2, 3])]
    assert spanning_groups(Layout(ep=2, tp=2), hosts) == [("ep/tp", [0, 1, 2, 3])]
    warning = span_warning(Layout(tp=4), hosts)
    assert warning == (
        "warning: dp=1 x pp=1 x tp=4: the tp group of ranks [0, 1, 2, 3] spans hosts (rank 0 on hosta, rank 1 on "
        "hosta, rank 2 on hostb, rank 3 on hostb); its collectives in every layer cross the network. Keep tp "
        "within one host (tp <= 2 here) and put pipeline stages (--pp) or replicas (--dp) across hosts"
    )
    assert span_warning(Layout(tp=2), ["", ""]) is None  # one host


def _info(rank, host):
    return EngineInfo(rank=rank, engine_id=rank, host=host, pid=100 + rank, device="cpu", device_name="cpu",
                      backend="gloo", memory_free_bytes=2**30, memory_total_bytes=2**31, threads=1, transport="gloo")


def test_the_engines_table_groups_rows_by_host():
    table = format_engines([_info(0, "hosta"), _info(1, "hosta"), _info(2, "hostb")]).splitlines()
    assert table[0].split() == ["rank", "host", "pid", "device", "backend", "transport", "threads", "free", "/",
                                "total", "memory"]
    assert table[1] == "hosta: 2 engines, ranks 0-1"
    assert table[2].split()[:2] == ["0", "hosta"] and table[3].split()[:2] == ["1", "hosta"]
    assert table[4] == "hostb: 1 engine, rank 2"
    assert table[5].split()[:2] == ["2", "hostb"]
    # one host: the table as it always was
    assert "hosta:" not in format_engines([_info(0, "hosta"), _info(1, "hosta")])


def test_the_slurm_script_ipyparallel_writes_holds_the_hosts_and_mpbooks_engine(tmp_path):
    from ipyparallel.cluster.launcher import SlurmEngineSetLauncher

    config = Config()
    assert configure_engines(config, "slurm", SLOTS, python=sys.executable, environment={"A": "1"}) == "slurm"
    launcher = SlurmEngineSetLauncher(config=config, work_dir=str(tmp_path), profile_dir=str(tmp_path), cluster_id="c1")
    launcher.write_batch_script(4)
    script = open(launcher.batch_file).read().splitlines()
    assert script[0] == "#!/bin/sh"
    assert {"#SBATCH --nodelist=hosta,hostb", "#SBATCH --nodes=2", "#SBATCH --ntasks=4", "#SBATCH --ntasks-per-node=2",
            "#SBATCH --job-name=ipengine-c1", "#SBATCH --export=ALL"} <= set(script)
    srun = script[-1].split()
    assert srun[:5] == ["srun", sys.executable, "-m", "mpbook.cluster.launch", "engine"]
    # the cluster's profile and id, and mpbook's environment, travel in sbatch's environment (--export=ALL)
    env = launcher.get_env()
    assert (env["IPP_PROFILE_DIR"], env["IPP_CLUSTER_ID"], env["A"]) == (str(tmp_path), "c1", "1")


def test_the_mpi_launcher_gets_the_hosts_for_mpiexec():
    from ipyparallel.cluster.launcher import MPIEngineSetLauncher

    config = Config()
    assert configure_engines(config, "mpi", SLOTS, python=sys.executable, environment={}) == "mpi"
    launcher = MPIEngineSetLauncher(config=config, profile_dir="/tmp/p", cluster_id="c1")
    launcher.n = 4
    args = launcher.find_args()
    assert args[1:5] == ["-n", "4", "-hosts", "hosta:2,hostb:2"]
    assert args[5:9] == [sys.executable, "-m", "mpbook.cluster.launch", "engine"]


def test_start_options_for_hosts_need_hosts_in_the_magic():
    from mpbook.magics import parse

    args = parse("start --hosts hosta:2,hostb:2 --ip 192.0.2.1 --launcher slurm --python /opt/py/bin/python", cell=False)
    assert (args.hosts, args.ip, args.launcher, args.python) == ("hosta:2,hostb:2", "192.0.2.1", "slurm",
                                                                 "/opt/py/bin/python")


# ------------------------------------------------------------------ the planner's suggestions
def _suggestions(hosts, links=()):
    """The planner's suggestions for the tiny model on one engine per host in ``hosts``, each
    with plenty of memory, and the ``links`` measured between them."""
    from mpbook import plan
    from mpbook.models import tiny_config
    from mpbook.planner import Device, model_tensors
    from mpbook.planner.ranks import PlannedModel
    from mpbook.planner.suggestions import suggest

    config = tiny_config()
    workload = plan(config, batch=4, tp=len(hosts), device_memory_bytes=1 << 40, suggestions=False).workload
    devices = [Device("cpu", host, 1 << 40, links=tuple(x for x in links if r in (x.low, x.high)))
               for r, host in enumerate(hosts)]
    model = PlannedModel.read(config, model_tensors(config, "float32"))
    return {str(s.layout): s for s in suggest(model, workload, len(hosts), devices) if s.valid}


def _links(hosts, within_s, across_s):
    from mpbook.bench_links import Link

    return [Link(a, b, hosts[a], hosts[b], across_s if hosts[a] != hosts[b] else within_s, 1e9)
            for a in range(len(hosts)) for b in range(a + 1, len(hosts))]


HOSTS = ["hosta", "hosta", "hostb", "hostb"]
SPANS = "dp=1 x pp=1 x tp=4"


def test_suggestions_put_tensor_groups_inside_hosts_first_and_say_why():
    found = _suggestions(HOSTS)
    order = list(found)
    inside = [name for name in order if name != SPANS]
    assert order[-1] == SPANS, order  # the one layout whose tp group crosses hosts, last however small
    assert found[SPANS].reason.endswith("; tp group across hosts: the slow link in every layer")
    assert found["dp=1 x pp=2 x tp=2"].reason.endswith("; tp/ep groups inside hosts")
    assert found["dp=2 x pp=1 x tp=2"].reason.endswith("; tp/ep groups inside hosts")
    assert "hosts" not in found["dp=1 x pp=4 x tp=1"].reason  # no tp group: nothing to say
    # among those inside hosts, the order is the one host's: most headroom first
    assert [found[n].peak_bytes for n in inside] == sorted(found[n].peak_bytes for n in inside)


def test_measured_links_decide_whether_crossing_hosts_costs():
    slow = _suggestions(HOSTS, _links(HOSTS, within_s=1e-4, across_s=1e-3))
    assert list(slow)[-1] == SPANS
    assert slow[SPANS].reason.endswith("; tp group across hosts (measured 1.000 ms across vs 0.100 ms within)")
    # a link measured no slower than within a host (as two namespaces on one VM are): no penalty
    even = _suggestions(HOSTS, _links(HOSTS, within_s=2e-4, across_s=2.5e-4))
    assert even[SPANS].reason.endswith("; tp group across hosts, measured 0.250 ms across vs 0.200 ms within: "
                                       "no slower here")
    one_host = _suggestions(["hosta"] * 4)
    assert [s.peak_bytes for s in even.values()] == [s.peak_bytes for s in one_host.values()]  # one host's order
    assert not any("hosts" in s.reason for s in one_host.values())  # one host: as always
