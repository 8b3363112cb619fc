"""Reliability on real CPU engines: a killed engine, a mismatched collective, clean stops, a soak.

Timings that a person would want to know are printed (run with ``-s`` to see them); the
assertions on time are generous bounds, because other work shares these cores.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import psutil
import pytest
from IPython.core.error import UsageError

from cluster_probe import alive, gone_within, snapshot
from mpbook import MpbookError, RankError, Workbench
from mpbook.errors import CollectiveError, EngineDiedError
from mpbook.soak import soak

ALL_REDUCE = "t = torch.tensor([rank + 1.0])\ndist.all_reduce(t)\nprint('sum', t.item())"


class KillWhenStarted(threading.Thread):
    """SIGKILL ``pid`` as soon as its cell has started (it touches ``marker``), not after a guess."""

    def __init__(self, pid: int, marker, timeout_s: float = 30.0, sig: int = signal.SIGKILL):
        super().__init__(daemon=True)
        self.pid, self.marker, self.timeout_s, self.sig = pid, marker, timeout_s, sig
        self.killed_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.marker.exists():
            # the time is taken before the kill: the cell can see the death (and the test read
            # killed_at) before this thread runs again
            self.killed_at = time.monotonic()
            os.kill(self.pid, self.sig)


def sleeping_cell(folder) -> str:
    """A long cell that first says, through a file, that it has started on this rank."""
    return (
        "import pathlib, time\n"
        f"pathlib.Path({str(folder)!r}, f'started-{{rank}}').touch()\n"
        "time.sleep(60)\n"
    )


def magics_of(shell):
    return shell.magics_manager.registry["MpMagics"]


# ------------------------------------------------------------------------ a killed engine
@pytest.mark.cluster
@pytest.mark.parametrize("transport", ["gloo", "mpi"])
def test_engine_killed_mid_cell_names_its_rank_at_once_and_restart_brings_it_back(shell, tmp_path, capsys, transport):
    assert shell.run_cell(f"%mp start -n 2 --cpu --transport {transport}").success
    wb = magics_of(shell).workbench
    assert {e.transport for e in wb.engines} == {transport}
    pid = wb.engines[1].pid
    killer = KillWhenStarted(pid, tmp_path / "started-1")
    killer.start()

    result = shell.run_cell("%%mp run\n" + sleeping_cell(tmp_path))
    noticed = time.monotonic()
    killer.join()
    assert killer.killed_at is not None, "the cell never started on rank 1"
    err = result.error_in_exec
    assert isinstance(err, EngineDiedError) and isinstance(err, RankError)
    assert err.ranks == [1]
    assert f"rank 1 (pid {pid}) died while running the cell" in str(err)
    assert "%mp restart" in str(err)
    took = noticed - killer.killed_at
    assert took < 30, f"the death of rank 1 took {took:.1f} s to show"
    with capsys.disabled():
        print(f"\nSIGKILL of rank 1 mid-cell -> EngineDiedError in {took:.3f} s")

    if transport == "gloo":
        # rank 0 was interrupted, not left sleeping: it answers at once
        began = time.monotonic()
        assert wb.client[wb.engine_ids([0])[0]].apply_sync(os.getpid) == wb.engines[0].pid
        assert time.monotonic() - began < 5
    # (Under MPI the world ends with the engine: MPICH's shared-memory peers do not outlive
    # a peer's death. The dead rank is named all the same, and restart starts a new world.)

    # the next cell says so before it runs anything
    result = shell.run_cell("%%mp run\nprint(rank)")
    assert isinstance(result.error_in_exec, EngineDiedError)
    assert f"rank 1 (pid {pid})" in str(result.error_in_exec) and "run `%mp restart`" in str(result.error_in_exec)
    capsys.readouterr()

    assert shell.run_cell("%mp restart").success
    assert wb.world_size == 2 and [e.rank for e in wb.engines] == [0, 1]
    assert pid not in {e.pid for e in wb.engines}
    assert shell.run_cell("%%mp run\n" + ALL_REDUCE).success
    out = capsys.readouterr().out
    assert "[rank 0] sum 3.0" in out and "[rank 1] sum 3.0" in out


@pytest.mark.cluster
def test_an_engine_that_crashes_on_a_signal_names_the_signal_and_where_it_was(tmp_path):
    """A segfault (here sent, as a library's bad pointer would raise it) leaves no traceback in
    the notebook: the engine's own fatal-error report names the signal and the Python frame it
    hit. The cluster's folder of reports goes with the stop, the crashed engine's with it."""
    from mpbook.cluster import crash_report

    with Workbench.start(2, cpu=True, transport="gloo") as wb:
        folder = wb.cluster.crash_reports
        pid = wb.engines[1].pid
        assert os.path.exists(crash_report.report_path(folder, pid))  # armed at the engine's start
        crasher = KillWhenStarted(pid, tmp_path / "started-1", sig=signal.SIGSEGV)
        crasher.start()
        with pytest.raises(EngineDiedError) as info:
            wb.run(sleeping_cell(tmp_path))
        crasher.join()
        assert crasher.killed_at is not None, "the cell never started on rank 1"
        assert info.value.ranks == [1]
        cause = info.value.causes[1]
        assert cause.startswith("Segmentation fault, in <module> (") and cause.endswith(":3)"), cause  # time.sleep
        assert f"rank 1 (pid {pid}) died while running the cell (rank 1: {cause}); run `%mp restart`" in str(info.value)
        with pytest.raises(EngineDiedError, match=r"has died \(rank 1: Segmentation fault, in "):
            wb.run("print(rank)")
    assert not os.path.exists(folder)


@pytest.mark.cluster
def test_engine_killed_during_apply_names_its_rank(tmp_path):
    def sleep(state, folder):
        import pathlib
        import time

        pathlib.Path(folder, f"started-{state.rank}").touch()
        time.sleep(60)

    with Workbench.start(2, cpu=True) as wb:
        pid = wb.engines[0].pid
        eid = wb.engine_ids([0])[0]
        # The engine's nanny would tell the controller at once; kill it first, so that only
        # the heartbeat (and mpbook's own check of the pid) can notice.
        for nanny in psutil.Process(pid).children():
            nanny.kill()
        killer = KillWhenStarted(pid, tmp_path / "started-0")
        killer.start()
        with pytest.raises(EngineDiedError) as info:
            wb.apply(sleep, str(tmp_path), what="the sleep")
        took = time.monotonic() - killer.killed_at
        assert info.value.ranks == [0]
        assert f"rank 0 (pid {pid}) died while running the sleep" in str(info.value)
        assert took < 30
        print(f"\nSIGKILL of rank 0 (and its nanny) mid-apply -> EngineDiedError in {took:.3f} s")
        # ipyparallel's heartbeat unregisters the engine too, which is what an attached
        # cluster (whose pids mpbook does not watch) relies on
        deadline = time.monotonic() + 30
        while eid in wb.client.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eid not in wb.client.ids
        print(f"controller unregistered it {time.monotonic() - killer.killed_at:.2f} s after the kill")
    # (a restart after a kill: test_engine_killed_mid_cell...; the killed rank 0's rendezvous
    # folder is removed by the stop: conftest checks that nothing is left at the end)


@pytest.mark.cluster
def test_controller_killed_mid_cell_is_an_error_and_restart_recovers(tmp_path):
    with Workbench.start(2, cpu=True) as wb:
        before = snapshot(wb)
        controller = wb.pids()["controller"][0]
        killer = KillWhenStarted(controller, tmp_path / "started-0")
        killer.start()
        with pytest.raises(MpbookError, match=rf"controller \(pid {controller}\) died while running the cell; run `%mp restart`"):
            wb.run(sleeping_cell(tmp_path))
        assert time.monotonic() - killer.killed_at < 30
        wb.restart()
        # the killed controller's own child (its heart monitor) went too, and the engines
        assert gone_within(before, 0) == ([], [])
        wb.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == 2")


# ------------------------------------------------------------------------ mismatched collectives
def rendezvous(wb) -> list[str]:
    """Where each rank's process group met: a rebuilt group meets at a fresh rendezvous."""
    return wb.apply(lambda s: s.rendezvous.path, stream=False)


def reduce_sum(state):
    import torch
    import torch.distributed as dist

    t = torch.tensor([state.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def test_rank_0_removes_a_rendezvous_folder_only_once_every_rank_has_left_its_group(workbench, capsys):
    """torch's FileStore, destroyed as a rank leaves its group, looks for its file and then
    opens it again; a file removed in between is waited for until the store times out (CI saw
    a rank leave a whole 60 s timeout late). So rank 0 leaving does not remove the folder: the
    next group's rendezvous does, once every rank has left."""
    from mpbook.engine import group

    cluster = workbench.cluster
    folder = os.path.dirname(rendezvous(workbench)[0])
    cluster.client[cluster.engine_ids([0])].apply_sync(group.teardown, keep_model=True)
    assert os.path.isdir(folder)  # rank 1 is still in the group, with a store on its file
    began = time.monotonic()
    cluster.client[cluster.engine_ids([1])].apply_sync(group.teardown, keep_model=True)
    left_in = time.monotonic() - began
    with capsys.disabled():
        print(f"\nrank 1 left its group {left_in:.2f} s after rank 0 had")
    assert left_in < 10  # its store's file was there: not the 60 s store timeout
    cluster.rebuild_group()  # both have left already; the new group meets at a new rendezvous
    assert not os.path.exists(folder)
    after = rendezvous(workbench)
    assert after[0] == after[1] and os.path.dirname(after[0]) != folder and os.path.isdir(os.path.dirname(after[0]))
    capsys.readouterr()
    workbench.run(ALL_REDUCE)
    out = capsys.readouterr().out
    assert "[rank 0] sum 3.0" in out and "[rank 1] sum 3.0" in out


def test_collective_entered_by_one_rank_errors_within_the_timeout_and_the_group_is_rebuilt(short_timeout, capsys):
    timeout_s = short_timeout.timeout_s
    before = rendezvous(short_timeout)[0]
    began = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        short_timeout.run("t = torch.ones(1)\nif rank == 0:\n    dist.all_reduce(t)\nprint('done', rank)")
    took = time.monotonic() - began
    err = info.value
    with capsys.disabled():
        print(f"\nmismatched collective (timeout {timeout_s:g} s) -> CollectiveError in {took:.2f} s")
    assert isinstance(err, RankError) and err.ranks == [0] and err.collective_ranks == [0] and err.rebuilt
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"the cell failed in a collective on rank 0 (it timed out after {timeout_s:g} s)")
    assert "rank 1 finished the cell without error" in message
    assert "the process group was rebuilt on every rank" in message
    # the error came with the timeout, not long after it (rebuilding takes well under a second)
    assert timeout_s - 0.5 < took < timeout_s + 10
    after = rendezvous(short_timeout)
    assert after[0] == after[1] != before
    capsys.readouterr()
    short_timeout.run(ALL_REDUCE)
    out = capsys.readouterr().out
    assert "[rank 0] sum 3.0" in out and "[rank 1] sum 3.0" in out


def test_rank_raising_instead_of_joining_a_collective_names_both_ranks(short_timeout):
    with pytest.raises(CollectiveError) as info:
        short_timeout.run("t = torch.ones(1)\nif rank == 1:\n    raise ValueError('bad shard')\ndist.all_reduce(t)")
    err = info.value
    assert err.ranks == [0, 1] and err.collective_ranks == [0]
    assert "rank 1 raised ValueError: bad shard" in str(err)
    assert "rebuilt" in str(err)
    assert short_timeout.apply(reduce_sum, stream=False) == [3.0, 3.0]


def test_collective_raising_inside_on_every_rank_through_apply(short_timeout):
    def mismatched(state):
        import torch
        import torch.distributed as dist

        t = torch.ones(state.rank + 1)  # different sizes: the ranks cannot agree
        dist.all_reduce(t)

    with pytest.raises(CollectiveError) as info:
        short_timeout.apply(mismatched, what="the mismatched all_reduce")
    assert info.value.collective_ranks == [0, 1]
    assert str(info.value).startswith("the mismatched all_reduce failed in a collective on ranks 0, 1")
    assert short_timeout.apply(reduce_sum, stream=False) == [3.0, 3.0]


def test_an_error_outside_collectives_keeps_the_group_and_the_models(short_timeout):
    def remember(state):
        state.cache["model"] = "loaded"

    short_timeout.apply(remember, stream=False)
    before = rendezvous(short_timeout)
    with pytest.raises(RankError) as info:
        short_timeout.run("if rank == 1:\n    raise KeyError('no such layer')")
    assert type(info.value) is RankError and info.value.ranks == [1]
    assert rendezvous(short_timeout) == before
    assert short_timeout.apply(lambda s: s.cache.get("model"), stream=False) == ["loaded", "loaded"]
    # whereas a failed collective forgets what the cache held, except a loaded model
    with pytest.raises(CollectiveError):
        short_timeout.run("if rank == 0:\n    dist.barrier()")
    assert short_timeout.apply(lambda s: s.cache.get("model"), stream=False) == [None, None]


def test_a_loaded_model_stays_across_a_rebuilt_group(short_timeout, tiny_folder):
    """A failed collective (or an interrupt) forms the group again; the model loaded before is
    kept and its collectives move to the new group: the next run loads nothing and gives the
    same tokens."""
    prompts = ["Explain pipeline parallelism.", "Hi"]
    first = short_timeout.generate(prompts, strategy="tensor", model=tiny_folder, max_new_tokens=4)
    with pytest.raises(CollectiveError):
        short_timeout.run("if rank == 0:\n    dist.barrier()")
    again = short_timeout.generate(prompts, strategy="tensor", model=tiny_folder, max_new_tokens=4)
    assert again.load_seconds == [0.0, 0.0]
    assert again.token_ids == first.token_ids
    assert again.total_collectives()["all_reduce"] == first.total_collectives()["all_reduce"]


def test_a_rank_too_busy_to_leave_the_group_is_named_and_the_next_rebuild_works(short_timeout):
    """Forming the group again needs every rank to leave the old one first: a rank still
    running earlier work within the timeout is named, with the way back, and the cluster
    stays usable once it is free."""
    cluster = short_timeout.cluster
    busy = cluster.client[cluster.engine_ids([1])].apply_async(time.sleep, cluster.timeout_s + 2)
    began = time.monotonic()
    with pytest.raises(MpbookError) as info:
        cluster.rebuild_group()
    took = time.monotonic() - began
    assert str(info.value) == (f"rank 1 did not leave the process group within the {cluster.timeout_s:g} s timeout "
                               "(still running earlier work); run `%mp restart` (or Workbench.restart()) to bring "
                               "the cluster back")
    assert cluster.timeout_s - 0.5 < took < cluster.timeout_s + 5
    busy.get(timeout=30)
    cluster.rebuild_group()
    assert short_timeout.apply(reduce_sum, stream=False) == [3.0, 3.0]


@pytest.mark.parametrize("timeout", [0, -1, 61, 3600, math.nan, math.inf])
def test_collective_timeout_is_checked_before_anything_starts(timeout):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(MpbookError, match="at most 60 s"):
        Workbench.start(2, cpu=True, timeout_s=timeout)
    assert alive({p.pid for p in psutil.Process().children(recursive=True)} - before) == []


@pytest.mark.parametrize("value", ["0", "61", "nan", "inf", "1e400"])
def test_mp_start_timeout_is_checked_by_the_magic(shell, value):
    result = shell.run_cell(f"%mp start --cpu --timeout {value}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "at most 60 s" in str(result.error_in_exec)
    assert magics_of(shell).workbench is None


# ------------------------------------------------------------------------ clean stops
@pytest.mark.cluster
def test_stop_while_a_cell_runs_is_prompt_and_complete(tmp_path):
    wb = Workbench.start(2, cpu=True)
    try:
        snap = snapshot(wb)
        wb.client[wb.engine_ids()].execute(sleeping_cell(tmp_path), block=False)
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(list(tmp_path.iterdir())) == 2, "the cell did not start"
    finally:
        began = time.monotonic()
        wb.stop()
        took = time.monotonic() - began
    # engines ignore SIGTERM while a cell runs; without the interrupt first this took 5 s more
    assert took < 10, f"stopping a busy cluster took {took:.1f} s"
    assert gone_within(snap, 0) == ([], [])


def _write_bytes_that_are_not_text(state):
    import os

    os.write(1, b"raw bytes from a cell: \xf0(\n")  # a 4-byte UTF-8 start, then no continuation


@pytest.mark.cluster
def test_an_engine_that_wrote_bytes_that_are_not_text_is_stopped_to_the_end(monkeypatch):
    """ipyparallel reads each engine set's output as UTF-8 after stopping it; output that is
    not text failed its stop there and left the set behind, and its Cluster stopped it again
    when garbage-collected, in the middle of whatever ran then (CI: another test's ast.parse
    failed with a SystemError). mpbook's stop leaves nothing for ipyparallel to do later."""
    import gc
    import sys

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    wb = Workbench.start(2, cpu=True)
    try:
        snap = snapshot(wb)
        wb.apply(_write_bytes_that_are_not_text, stream=False)
        ipp_cluster = wb.cluster.ipp_cluster
        outputs = [launcher.output_file for engine_set in ipp_cluster.engines.values()
                   for launcher in [engine_set, *getattr(engine_set, "launchers", {}).values()]
                   if getattr(launcher, "output_file", "")]

        def written() -> bool:  # mpiexec forwards the engines' output as it comes
            return any(os.path.isfile(path) and b"from a cell: \xf0" in open(path, "rb").read() for path in outputs)

        deadline = time.monotonic() + 20
        while not written() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outputs and written()
    finally:
        wb.stop()
    assert gone_within(snap, 0) == ([], [])
    assert ipp_cluster.engines == {} and ipp_cluster.controller is None
    assert not any(os.path.exists(path) for path in outputs)
    del wb, ipp_cluster
    gc.collect()
    assert [(u.exc_type.__name__, str(u.exc_value)) for u in raised] == []


# ------------------------------------------------------------------------ soak
def test_soak_50_all_reduce_cells_no_failure_no_memory_creep(shared_shell):
    shell = shared_shell
    wb = magics_of(shell).workbench
    engines = [e.pid for e in wb.engines]
    cell = "%%mp run\nt = torch.tensor([rank + 1.0])\ndist.all_reduce(t)\nassert t.item() == 3.0"
    report = soak(shell, cell, engines + wb.pids()["controller"] + [os.getpid()], cells=50, warmup=10)
    print("\nsoak:", report.summary())
    assert report.failure is None, report.failure
    assert len(report.seconds) == 50
    growth = report.growth()
    assert set(engines) <= set(growth)
    for pid in engines:
        assert growth[pid] < 0.05, report.summary()


def test_soak_of_generation_cells_no_failure_no_memory_creep(shared_shell, tiny_folder):
    from mpbook.bench import SOAK_CELL

    shell = shared_shell
    wb = magics_of(shell).workbench
    engines = [e.pid for e in wb.engines]
    report = soak(shell, SOAK_CELL.format(model=tiny_folder), engines, cells=25, warmup=5)
    print("\nsoak:", report.summary())
    assert report.failure is None and len(report.seconds) == 25
    assert report.max_growth() < 0.05, report.summary()


@pytest.mark.cluster
def test_a_controller_that_stops_while_starting_is_started_again(monkeypatch, caplog):
    """A controller can lose a port it chose to another process before binding it; it then
    exits at start. Here the first one ends at once (its owner watch sees no owner)."""
    import subprocess

    from mpbook.cluster.lifecycle import Cluster

    gone = subprocess.Popen(["true"])
    gone.wait()
    launch, tries = Cluster._launch, []

    def first_without_owner(cluster):
        tries.append(cluster)
        if len(tries) == 1:
            cluster.owner_pid = gone.pid
        launch(cluster)

    monkeypatch.setattr(Cluster, "_launch", first_without_owner)
    already = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' clusters
    with caplog.at_level("WARNING", logger="mpbook"), Workbench.start(2, cpu=True) as wb:
        # (a third try when the second one's engines stopped while starting, which the start
        # also survives: seen once in a parallel test run, its engines stuck in MPI's start)
        assert len(tries) == 2 or (len(tries) == 3 and "exited while the cluster was starting" in caplog.text), tries
        assert tries[0].stopped
        assert "the cluster's controller stopped while starting" in caplog.text
        assert "starting the cluster again" in caplog.text
        assert wb.apply(reduce_sum, stream=False) == [3.0, 3.0]
        first = {p.pid for p in psutil.Process().children(recursive=True)} - already - set(snapshot(wb)["pids"])
        assert not alive(first), "the first try left processes behind"
        print("\n" + caplog.text.strip())
