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

# A cluster id of this test process's own: pytest-xdist's worksteal may hand some of this
# module's tests to another worker, which then starts a cluster of its own beside this one
# (with one id, its engines would join this one's, and its last test would kill them).
PROFILE, CLUSTER_ID = "host-names", f"named-{os.getpid()}"
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
        # An engine waits only 10 s for the controller's connection file, then gives up: start
        # the engines once it is there (a loaded CI machine took longer, and one engine never came).
        from IPython.core.profiledir import ProfileDir
        from IPython.paths import get_ipython_dir

        security = ProfileDir.find_profile_dir_by_name(get_ipython_dir(), PROFILE).security_dir
        connection = os.path.join(security, f"ipcontroller-{CLUSTER_ID}-engine.json")
        deadline = time.monotonic() + 60
        while not os.path.exists(connection):
            assert started[0].poll() is None, f"the controller exited with status {started[0].returncode}"
            assert time.monotonic() < deadline, f"the controller wrote no {connection} in 60 s"
            time.sleep(0.1)
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


def by_host(wb) -> list[tuple[str, list[int]]]:
    """What the figures should show: each host's ranks, in rank order."""
    groups: list[tuple[str, list[int]]] = []
    for info in wb.engines:
        if groups and groups[-1][0] == info.host:
            groups[-1][1].append(info.rank)
        else:
            groups.append((info.host, [info.rank]))
    return groups


def test_the_dashboard_groups_its_rows_by_host(across):
    import io

    from mpbook.compat import ipywidgets as widgets_compat
    from mpbook.dashboard import Dashboard

    expected = by_host(across)
    headings = [f"{host}: rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" for host, ranks in expected]

    # the widget: a heading row over each host's ranks, then their cells, rank order within
    dash = Dashboard(across, mode="widget")
    across.run("import time; time.sleep(0.6)", dashboard=dash, stream=False)
    grid = dash.view.widget.children[1]
    rows = [c for c in grid.children if "mpbook-host" in widgets_compat.css_classes(c)]
    assert [c.value for c in rows] == [f"<b>{h}</b>" for h in headings]
    order = []  # (heading, rank) in the grid's order
    for cell in grid.children[len(dash.view.columns):]:
        classes = widgets_compat.css_classes(cell)
        if "mpbook-host" in classes:
            order.append(cell.value)
        elif "mpbook-col-rank" in classes:
            order.append(int(cell.value))
    assert order == [x for h, (_, ranks) in zip(headings, expected) for x in [f"<b>{h}</b>", *ranks]]
    assert all(dash.view.values()[r]["host"] == host for host, ranks in expected for r in ranks)

    # the text: a line naming each host, its ranks' lines under it
    out = io.StringIO()
    text = Dashboard(across, mode="text", out=out, text_every_s=0.2)
    across.run("import time; time.sleep(1.0)", dashboard=text, stream=False)
    lines = [line.split("] ", 1)[-1] for line in out.getvalue().splitlines() if line.startswith("[mpbook")]
    first = lines.index(headings[0])
    shown = lines[first:first + len(headings) + across.world_size]
    assert shown == [x for h, (_, ranks) in zip(headings, expected)
                     for x in [h, *(next(line for line in shown if line.startswith(f"  rank {r} ")) for r in ranks)]]


def host_labels(ax) -> list[str]:
    """The host names a plot put beside (or under) its ranks."""
    return [t.get_text() for child in ax.child_axes for t in [*child.get_xticklabels(), *child.get_yticklabels()]
            if t.get_text()]


def test_the_plots_group_ranks_by_host(across):
    from mpbook.engine.state import telemetry_snapshot
    from mpbook.plots import plot_collectives, plot_memory, plot_timeline

    hosts = [host for host, _ in by_host(across)]
    result = across.generate(["Hello there"], strategy="pipeline", model="tiny", max_new_tokens=3)
    assert result.hosts == [e.host for e in across.engines]

    timeline = plot_timeline(result).axes[0]
    assert host_labels(timeline) == hosts
    # rows: each host's ranks together (stage order within), as the ranks are by host
    rows = [t.get_text() for t in timeline.get_yticklabels()]
    assert rows == [f"stage {r}" for r in range(across.world_size)]
    assert host_labels(plot_memory(result).axes[0]) == hosts
    assert all(host_labels(ax) == hosts for ax in plot_collectives(result).axes[:2])
    # snapshots carry their engine's host
    snapshots = across.client[across.engine_ids()].apply_sync(telemetry_snapshot)
    assert host_labels(plot_memory(snapshots).axes[0]) == hosts
    # one host: nothing added
    one = [{**snap, "host": "hosta"} for snap in snapshots]
    assert plot_memory(one).axes[0].child_axes == []
    assert plot_timeline(result, hosts=["hosta"] * across.world_size).axes[0].child_axes == []


def test_the_planner_gets_each_ranks_host_and_measured_links_from_the_engines(across):
    from mpbook import plan

    links = across.measure_links()
    assert {link.across_hosts for link in links} == {True, False}
    devices = plan("tiny", pp=across.world_size, engines=across).devices
    assert [d.host for d in devices] == [e.host for e in across.engines]
    assert all(d.links for d in devices)  # each rank, its links to the others
    assert {(x.low, x.high) for d in devices for x in d.links} == {(x.low, x.high) for x in links}


def test_one_rank_interrupted_alone_across_hosts_ends_the_run_within_3_s(across):
    """Over gloo, as engines on other hosts are: the interrupted rank ends its connections to
    the others by their addresses (they are on other hosts as far as it knows)."""
    from test_interrupt_one_rank import check_the_next_run, interrupted_alone

    assert {e.transport for e in across.engines} == {"gloo"}
    took, error = interrupted_alone(across, 1, strategy="pipeline")
    print(f"\npipeline pp={across.world_size} across hosts, rank 1 interrupted alone: the run ended {took:.2f} s "
          f"later; {[(f.rank, f.ename) for f in error.failures]}", end="")
    assert took < 3.0, f"the run ended {took:.1f} s after the interrupt: {error}"
    check_the_next_run(across, strategy="pipeline")


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
