"""The workbench on real CPU engines: lifecycle, process group, running code, errors."""

from __future__ import annotations

import _thread
import os
import threading
import time

import pytest

from cluster_probe import alive, gone_within, process_tree, processes, snapshot
from mpbook import RankError, Workbench
from mpbook.cluster.transport import mpi_shared_memory_files
from mpbook.devices import EngineSpec


@pytest.mark.cluster
def test_start_restart_and_stop_replace_then_end_every_process_port_and_folder(capfd):
    wb = Workbench.start(2, cpu=True)
    try:
        assert wb.world_size == 2
        assert [e.rank for e in wb.engines] == [0, 1]
        assert all(e.backend == "gloo" and e.device == "cpu" for e in wb.engines)
        assert all(e.memory_free_bytes > 0 and e.memory_total_bytes >= e.memory_free_bytes for e in wb.engines)
        assert len({e.pid for e in wb.engines}) == 2
        # two cores shared by two engines: one intra-op thread each
        assert all(e.threads == max(1, EngineSpec.choose(2, cpu=True).threads) for e in wb.engines)
        before = process_tree(wb)
        assert {e.pid for e in wb.engines} <= set(before)
        assert alive(before) == before

        wb.restart()
        after = process_tree(wb)
        assert alive(before) == []
        assert set(before).isdisjoint(after)
        assert [e.rank for e in wb.status()] == [0, 1]
        wb.run("t = torch.ones(1); dist.all_reduce(t); assert t.item() == world_size")
        snap = snapshot(wb)  # after a collective: gloo's listeners are among the ports
        shared_memory = mpi_shared_memory_files(p.pid for p in processes(wb))
        assert shared_memory or wb.engines[0].transport != "mpi"  # MPICH's file of the world
        assert len(snap["pids"]) >= 5  # controller, 2 engines, 2 nannies
        assert snap["listening"] and os.path.isdir(snap["rendezvous_dir"])
    finally:
        began = time.monotonic()
        wb.stop()
        took = time.monotonic() - began
    assert gone_within(snap, 0) == ([], [])  # stop returns once everything is gone
    assert not os.path.exists(snap["rendezvous_dir"])
    assert [path for path in shared_memory if os.path.exists(path)] == []  # MPICH leaves it: stop removes it
    # every engine ended as asked (SIGTERM); one that exits with an error has its whole log
    # printed by ipyparallel, which would land in the notebook on every stop
    time.sleep(0.5)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "engine" not in err.lower(), err[-2000:]
    print(f"\nWorkbench.stop() took {took:.2f} s")


def test_all_reduce_across_the_process_group(workbench):
    def reduce(state):
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(state.rank + 1)])
        dist.all_reduce(t)
        return state.rank, dist.get_world_size(), t.item()

    assert workbench.apply(reduce) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_run_streams_output_labelled_by_rank_while_running(workbench, capsys):
    began = time.monotonic()
    seen = []  # (seconds since start, text) for each tick of the wait loop

    def tick():
        seen.append((time.monotonic() - began, capsys.readouterr().out))

    workbench.run("import time\nprint('early', rank, flush=True)\ntime.sleep(3)\nprint('late', rank)", on_tick=tick)
    seen.append((time.monotonic() - began, capsys.readouterr().out))
    early = [t for t, out in seen if "[rank 0] early 0" in out or "[rank 1] early 1" in out]
    everything = "".join(out for _, out in seen)
    assert everything.count("early") == 2 and everything.count("late") == 2
    assert "[rank 0] late 0" in everything and "[rank 1] late 1" in everything
    # the early lines showed up while the engines were still sleeping
    assert early and early[0] < 3.0, seen


def test_run_on_chosen_ranks(workbench, capsys):
    workbench.run("print('here', rank)", ranks="1")
    out = capsys.readouterr().out
    assert "[rank 1] here 1" in out and "[rank 0]" not in out


def test_error_on_one_rank_names_the_rank_and_keeps_the_cluster(workbench):
    with pytest.raises(RankError) as info:
        workbench.run("if rank == 1:\n    raise ValueError('bad shard')\n")
    err = info.value
    assert err.ranks == [1]
    assert "rank 1" in str(err) and "ValueError: bad shard" in str(err)
    rendered = "\n".join(err._render_traceback_())
    assert "[rank 1] ValueError: bad shard" in rendered
    # the cluster is still usable
    assert workbench.apply(lambda s: s.rank) == [0, 1]


def test_keyboard_interrupt_reaches_the_engines(workbench):
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        workbench.run("import time\ntime.sleep(60)")
    assert time.monotonic() - began < 10
    # the engines stopped sleeping: the next cell runs at once
    began = time.monotonic()
    assert workbench.apply(lambda s: s.rank) == [0, 1]
    assert time.monotonic() - began < 5
