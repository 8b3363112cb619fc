"""Collectives over MPI between CPU engines: the fallback, failures, and what a step is made of."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from mpbook import Workbench
from mpbook.engine.steps import START
from mpbook.errors import RankError

PROMPTS = ["Explain pipeline parallelism in one sentence.", "Hi", "What does an all-reduce do?", "Tensor parallel"]


@pytest.mark.cluster
def test_without_mpi4py_the_cluster_says_so_in_one_line_and_uses_gloo(tiny_folder):
    # A fresh interpreter where mpi4py cannot be imported, as on a machine without it.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mpi4py"] = None
        from mpbook import Workbench
        from mpbook.reference import reference
        with Workbench.start(2, cpu=True) as wb:
            print(wb.table())
            result = wb.generate({PROMPTS!r}, strategy="tensor", model={tiny_folder!r}, max_new_tokens=5)
            print("TRANSPORTS", sorted({{t for r in result.transports for t in r.values()}}))
        _, tokens = reference({tiny_folder!r}, {PROMPTS!r}, max_new_tokens=5)
        print("SAME", result.token_ids == tokens)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stdout.splitlines() if "MPI unavailable" in line]
    assert len(notes) == 1 and "mpi4py is not installed" in notes[0] and "gloo" in notes[0]
    assert "TRANSPORTS ['gloo']" in done.stdout and "SAME True" in done.stdout


def broken_mpiexec(folder):
    """A launcher that fails as MPI's start once did here: a rank aborts in MPI_Init, and
    mpiexec exits before any engine registers."""
    path = folder / "mpiexec.gforker"
    path.write_text("#!/bin/sh\n"
                    "echo 'Abort in MPI_Init_thread: failed to unpack address, invalid bandwidth 0.00' >&2\n"
                    "exit 15\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.cluster
def test_when_mpi_cannot_start_the_engines_auto_says_why_in_one_line_and_uses_gloo(tmp_path, monkeypatch, tiny_folder,
                                                                                    caplog):
    from mpbook.reference import reference

    monkeypatch.setattr("mpbook.cluster.transport.mpiexec_path", lambda: broken_mpiexec(tmp_path))
    began = time.monotonic()
    with Workbench.start(2, cpu=True) as wb:
        # Noticed when mpiexec exits, not at the engines' registration timeout (120 s).
        assert time.monotonic() - began < 60
        lines = [line for line in wb.table().splitlines() if "collectives" in line]
        assert len(lines) == 1 and "gloo" in lines[0] and "MPI did not start the engines" in lines[0]
        assert "failed to unpack address" in lines[0]
        assert {e.transport for e in wb.engines} == {"gloo"}
        result = wb.generate(PROMPTS, strategy="tensor", model=tiny_folder, max_new_tokens=5)
    assert result.token_ids == reference(tiny_folder, PROMPTS, max_new_tokens=5)[1]
    assert {t for r in result.transports for t in r.values()} == {"gloo"}
    # MPI was tried twice before gloo: the first failure said it would start again
    again = [r.getMessage() for r in caplog.records if "starting the cluster again" in r.getMessage()]
    assert len(again) == 1 and "mpiexec, which started the engines, exited" in again[0]


@pytest.mark.cluster
def test_asking_for_mpi_where_its_start_fails_is_an_error_naming_gloo(tmp_path, monkeypatch):
    from mpbook.errors import MpbookError

    monkeypatch.setattr("mpbook.cluster.transport.mpiexec_path", lambda: broken_mpiexec(tmp_path))
    with pytest.raises(MpbookError, match=r"(?s)MPI did not start the engines, twice \(mpiexec, which started the "
                                          r"engines, exited.*failed to unpack address.*the logs are in .*\); "
                                          r"start with transport='gloo' instead"):
        Workbench.start(2, cpu=True, transport="mpi")


def test_asking_for_mpi_on_gpu_engines_or_an_unknown_transport_is_refused_before_starting():
    from mpbook.cluster.transport import choose_transport
    from mpbook.errors import MpbookError

    with pytest.raises(MpbookError, match="GPU engines use NCCL"):
        choose_transport("mpi", use_gpu=True)
    with pytest.raises(MpbookError, match="choose one of auto, mpi, gloo"):
        choose_transport("shm", use_gpu=False)
    assert choose_transport("gloo", use_gpu=False).name == "gloo"


def _all_reduce_on_rank_0_only(state):
    import torch

    from mpbook.parallel.collectives import Group

    group = Group(None, rank=state.rank, size=state.world_size, ranks=list(range(state.world_size)), comm=state.mpi)
    return group.all_reduce(torch.ones(4)).tolist()


@pytest.mark.cluster
def test_an_mpi_collective_one_rank_enters_times_out_and_the_next_run_is_right(tiny_folder):
    from mpbook.reference import reference

    with Workbench.start(2, cpu=True, timeout_s=3) as wb:
        assert {e.transport for e in wb.engines} == {"mpi"}
        with pytest.raises(RankError, match="timed out waiting") as caught:
            wb.apply(_all_reduce_on_rank_0_only, ranks=[0], stream=False)
        assert "rank 0" in str(caught.value)
        # The communicator that timed out is never used again: the next run gets fresh ones.
        result = wb.generate(PROMPTS, strategy="tensor", model=tiny_folder, max_new_tokens=5)
        assert result.token_ids == reference(tiny_folder, PROMPTS, max_new_tokens=5)[1]
        assert {t for r in result.transports for t in r.values()} == {"mpi"}


@pytest.mark.parametrize("strategy, options", [("tensor", {}), ("pipeline", {"microbatches": 2})])
def test_the_step_breakdown_adds_up_to_the_decode_phase(workbench, tiny_folder, strategy, options):
    result = workbench.generate(PROMPTS, strategy=strategy, model=tiny_folder, max_new_tokens=24, ignore_eos=True,
                                **options)
    for rank, (parts, phases) in enumerate(zip(result.step_breakdown, result.rank_phase_seconds)):
        assert parts["count"] > 0, f"rank {rank} timed no decode step"
        named = sum(parts[p] for p in ("compute", "collectives", "waiting", "token choice", "host"))
        assert named == pytest.approx(parts["steps"], rel=1e-9)
        assert all(parts[p] >= 0 for p in ("compute", "collectives", "waiting", "token choice"))
        # the steps, timed one by one, are the decode phase the telemetry timed on its own
        assert parts["steps"] == pytest.approx(phases["decode"], rel=0.05), (rank, parts, phases)
    busy = result.step_breakdown
    if strategy == "tensor":
        assert all(b["collectives"] > 0 and b["waiting"] == 0 for b in busy)  # all-reduces, no stages
        assert all(b[START] == 0 for b in busy)
        assert "first steps" not in result.summary()
    else:
        assert busy[0]["waiting"] > 0 and busy[1]["waiting"] > 0  # tokens back, activations in
        # Stage 0's first steps wait for the last stage's prefill; a part of the waiting, shown apart.
        assert all(0 <= b[START] <= b["waiting"] for b in busy) and busy[0][START] > 0
        assert "in micro-batches' first steps" in result.summary()
    assert "decode step per rank, ms" in result.summary()


def test_decode_steps_overlap_across_stages_without_draining(workbench, tiny_folder):
    """Stage 0 starts a micro-batch's next step while stage 1 still works on the step before."""
    result = workbench.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=24, ignore_eos=True,
                                microbatches=2)
    steps = {}  # (stage, microbatch) -> that pair's decode bars in order, each (start, end) on one clock
    for e in sorted(result.timeline, key=lambda e: e.run_began + e.start):
        if e.phase == "decode":
            steps.setdefault((e.stage, e.microbatch), []).append((e.run_began + e.start, e.run_began + e.end))
    overlapping = 0
    for step in range(1, 23):
        ahead_start, ahead_end = steps[(0, 0)][step]  # stage 0, micro-batch 0, one step ahead
        behind_start, behind_end = steps[(1, 1)][step - 1]  # stage 1, micro-batch 1, the step before
        overlapping += ahead_start < behind_end and behind_start < ahead_end
    # A draining pipeline has none: stage 0 would start a step only once the last stage had
    # ended the step before for every micro-batch. Not every step shows it: with more busy
    # processes than cores (a parallel test run), a stage can wait for a core until its
    # peer's step has ended (2 of 10 steps overlapped once, under -n 2).
    assert overlapping >= 3, steps


def test_the_pipeline_takes_one_microbatch_per_stage_unless_told(workbench, tiny_folder):
    from mpbook.parallel.pipeline import decode_bubble, default_microbatches

    assert [default_microbatches(2, rows) for rows in (1, 2, 8)] == [1, 2, 2]
    assert default_microbatches(1, 8) == 1 and default_microbatches(4, 3) == 3
    assert decode_bubble(2, 1) == 0.5 and decode_bubble(2, 2) == 0.0 and decode_bubble(4, 3) == 0.25
    chosen = workbench.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=3)
    asked = workbench.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=3, microbatches=1)
    assert chosen.microbatches == 2 and asked.microbatches == 1
    said = [" ".join(r.summary().split()) for r in (chosen, asked)]
    assert "2 micro-batches per replica (the default: one per stage)" in said[0]
    assert "1 micro-batch per replica (as asked)" in said[1]
    assert chosen.token_ids == asked.token_ids
    assert {e.microbatch for e in chosen.timeline} == {0, 1}


@pytest.mark.cluster
def test_more_stages_than_cores_take_no_more_microbatches_than_can_compute_at_once(workbench, tiny_folder):
    """3 CPU engines on 2 cores: 2 ranks compute at once, so a 3-stage pipeline takes 2
    micro-batches by default (a third only takes turns on a core); asked for, 3 are taken, and
    both give one device's tokens. The engines are started from this process with its affinity
    set to 2 cores (they inherit it), so the test holds on any machine; the 2-engine workbench
    keeps one per stage. (2 replicas of 2 stages take 1 each: the rule's own checks below; 4
    more engines would load a 2-core machine's parallel test run for little.)"""
    import os

    from mpbook.parallel.pipeline import default_microbatches, layout_microbatches, stages_at_once
    from mpbook.reference import reference

    assert workbench.cluster.ranks_at_once is None or workbench.cluster.ranks_at_once >= 2
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.fail(f"this test needs 2 cores to pin its engines to; this process may use {len(before)}")
    os.sched_setaffinity(0, sorted(before)[:2])
    try:
        three = Workbench.start(3, cpu=True)
    finally:
        os.sched_setaffinity(0, before)
    try:
        assert three.cluster.ranks_at_once == 2
        assert [info.cores for info in three.cluster.engines] == [2, 2, 2]
        assert ("cores: 3 engines share 2, so 2 ranks compute at once (a pipeline takes no more micro-batches "
                "than its stages that can)") in three.cluster.table().splitlines()
        assert "cores:" not in workbench.cluster.table() or workbench.cluster.ranks_at_once is not None
        prompts = PROMPTS[:4]
        chosen = three.generate(prompts, strategy="pipeline", model=tiny_folder, max_new_tokens=4)
        asked = three.generate(prompts, strategy="pipeline", model=tiny_folder, max_new_tokens=4, microbatches=3)
        assert (chosen.microbatches, asked.microbatches) == (2, 3)
        assert {e.microbatch for e in chosen.timeline} == {0, 1}
        # the result says why: a newcomer who asked for 3 stages sees why 2 micro-batches
        assert ("2 micro-batches per replica (the default: 2 of the 3 stages can compute at once on these engines' "
                "cores; a micro-batch more would only take turns on one)") in " ".join(chosen.summary().split())
        _, one_device = reference(tiny_folder, prompts, max_new_tokens=4)
        assert chosen.token_ids == asked.token_ids == one_device
        # the rule itself: one per stage as rows allow, capped by the stages that fit the cores
        from mpbook.layout import Layout

        assert stages_at_once(Layout(pp=3), 2) == 2 and stages_at_once(Layout(dp=2, pp=2), 2) == 1
        assert stages_at_once(Layout(pp=2, tp=2), 2) == 1 and stages_at_once(Layout(pp=3), None) is None
        assert default_microbatches(3, 8, at_once=2) == 2 and default_microbatches(3, 1, at_once=2) == 1
        assert default_microbatches(3, 8) == 3
        # what bench, the planner, the explorer and the memory advice take for a layout: the cell's
        assert layout_microbatches(Layout(pp=3), len(prompts), three.cluster.ranks_at_once) == chosen.microbatches
        assert layout_microbatches(Layout(dp=2, pp=2), 4, 2) == 1 and layout_microbatches(Layout(pp=3), 8) == 3
    finally:
        three.stop()


def _half_precision_over_mpi(state):
    import torch

    from mpbook.parallel.collectives import Group

    group = Group(None, rank=state.rank, size=state.world_size, ranks=list(range(state.world_size)), comm=state.mpi)
    out = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.tensor([0.5, 1.25, -3.0, 1024.0], dtype=dtype) * (state.rank + 1)
        out[str(dtype)] = (group.all_reduce(x.clone()).float().tolist(),
                           group.all_gather_stack(x).float().tolist(),
                           group.broadcast(x.clone(), src=1).float().tolist())
    return out


def test_half_precision_travels_over_mpi_bit_for_bit(workbench):
    per_rank = workbench.apply(_half_precision_over_mpi, stream=False)
    base = [0.5, 1.25, -3.0, 1024.0]
    for dtype, (summed, gathered, broadcast) in per_rank[0].items():
        assert summed == [3 * v for v in base], dtype  # 1x + 2x, exact in every dtype here
        assert gathered == [base, [2 * v for v in base]] and broadcast == [2 * v for v in base], dtype
    assert per_rank[0] == per_rank[1]


def test_time_to_first_token_counts_from_the_runs_start_on_the_timelines_clock(workbench, tiny_folder):
    """A prompt's first token is chosen by the last stage after its micro-batch's prefill
    there; the stages may start their runs at different moments (a longer load), and the time
    to first token counts from the first of them, as the timeline does."""
    workbench.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=1)  # loaded
    # The last stage starts its run half a second after the first: its engine is busy with a cell.
    workbench.client[workbench.engine_ids([1])[0]].execute("import time; time.sleep(0.5)", block=False)
    result = workbench.generate(PROMPTS, strategy="pipeline", model=tiny_folder, max_new_tokens=4, microbatches=2)
    assert min(result.ttft_s) >= 0.45, result.ttft_s
    last_stage_prefill = {e.microbatch: e.end for e in result.timeline if e.phase == "prefill" and e.stage == 1}
    first_start = min(e.start for e in result.timeline)
    assert first_start >= 0
    for prompt, ttft in enumerate(result.ttft_s):
        microbatch = 0 if prompt < 2 else 1  # 4 prompts, 2 micro-batches
        assert ttft >= last_stage_prefill[microbatch] - 1e-3, (prompt, ttft, last_stage_prefill)


def test_bench_collectives_times_every_transport_both_ways(workbench):
    from mpbook.bench_transports import SIZES, Timing, _percentiles, format_timings, measure_on_engine

    per_rank = workbench.apply(measure_on_engine, repeats=20, warmup=5, stream=False)
    records = per_rank[0]
    seen = {(r["transport"], r["operation"], r["nbytes"]) for r in records}
    for transport in ("mpi", "gloo"):
        for nbytes in SIZES:
            assert (transport, "all_reduce", nbytes) in seen
            assert (transport, "all_reduce back to back", nbytes) in seen
        assert (transport, "send/recv", 4 << 10) in seen
    assert all(len(r["seconds"]) == 20 and min(r["seconds"]) > 0 for r in records)
    timings = [Timing(r["transport"], r["operation"], r["nbytes"], *_percentiles(r["seconds"])) for r in records]
    table = format_timings(timings, workbench.world_size)
    assert "all_reduce back to back" in table and "faster" in table


def test_engines_interrupted_without_the_client_leave_a_group_the_next_run_can_use(workbench, tiny_folder):
    # Workbench.interrupt from another thread: the engines end their run (and their group);
    # the client, itself not interrupted, gets every rank's KeyboardInterrupt and forms the
    # group again, so the next run works.
    import threading

    from mpbook.reference import reference

    timer = threading.Timer(1.5, workbench.interrupt)
    timer.start()
    try:
        with pytest.raises(RankError, match="KeyboardInterrupt"):
            workbench.generate(PROMPTS * 64, strategy="tensor", model=tiny_folder, max_new_tokens=400, ignore_eos=True)
    finally:
        timer.cancel()
    result = workbench.generate(PROMPTS, strategy="tensor", model=tiny_folder, max_new_tokens=5)
    assert result.token_ids == reference(tiny_folder, PROMPTS, max_new_tokens=5)[1]


LATE_BYTES = 64 << 20  # over glibc's largest mmap threshold: a freed buffer is unmapped at once


def _an_abandoned_all_reduce_completes_late(state):
    """Rank 1 gives up on an all-reduce (its timeout, as an interrupt or a departed peer would
    end the wait) and drops the communicator and the tensor it handed MPI; rank 0 enters the
    all-reduce only then. The request is still posted on rank 1, so its next MPI calls complete
    it and MPI writes the sum into that tensor's memory. Returns what each rank saw."""
    import gc
    import time

    import torch
    from mpi4py import MPI

    from mpbook.parallel.mpi import CollectiveTimeout

    comm = state.mpi.split(0, state.rank)  # a fresh communicator, for this test alone
    big = torch.full((LATE_BYTES // 4,), float(state.rank + 1))
    if state.rank == 1:
        comm.timeout_s = 0.2
        try:
            comm.all_reduce(big)
        except CollectiveTimeout:
            pass
        else:
            return "rank 1's all-reduce completed before rank 0 entered it"
        del comm, big
        gc.collect()
        ended = time.monotonic() + 3  # MPI progress while rank 0's half arrives: the late write
        while time.monotonic() < ended:
            MPI.COMM_WORLD.Iprobe()
            time.sleep(0.001)
        return "alive"
    time.sleep(1.0)
    comm.all_reduce(big)
    return big[:2].tolist()


def test_a_tensor_handed_to_an_abandoned_mpi_request_outlives_it(workbench):
    """An interrupt, a timeout or a departed peer ends a wait, not the request: MPI still owns
    the buffer and may write into it at any later MPI call. Freed with its communicator, that
    memory went back to the heap and the late write corrupted it (seen: an engine of an
    interrupted tensor-parallel run died in glibc's unlink_chunk); here, unmapped, it would
    kill the engine at once."""
    assert {e.transport for e in workbench.engines} == {"mpi"}
    seen = workbench.apply(_an_abandoned_all_reduce_completes_late, stream=False)
    assert seen == [[3.0, 3.0], "alive"], seen
    assert workbench.apply(lambda state: state.rank, stream=False) == [0, 1]  # both engines still up


def _spend_the_communicators(state):
    """Split MPI's world until MPICH has no communicator left for this process (every engine
    at once: a split is collective); how many it took."""
    from mpi4py import MPI

    held = []
    try:
        while True:
            held.append(MPI.COMM_WORLD.Split(0, state.rank))
    except MPI.Exception:
        return len(held)


@pytest.mark.cluster
def test_an_engine_out_of_mpi_communicators_says_so_and_a_restart_brings_it_back():
    """Old communicators are never freed (a freed one's context id comes back at once, and a
    stale message of the old run with it): an engine that has formed its group about a
    thousand times has none left, and forming the group again says why and what to do."""
    from mpbook.parallel.mpi import COMMUNICATORS_PER_PROCESS

    with Workbench.start(2, cpu=True) as wb:
        spent = wb.apply(_spend_the_communicators, stream=False)
        assert spent[0] == spent[1] and 0 < spent[0] < COMMUNICATORS_PER_PROCESS
        with pytest.raises(RankError) as caught:
            wb.cluster.rebuild_group()
        assert (f"this engine holds all {COMMUNICATORS_PER_PROCESS} MPI communicators MPICH gives a process"
                in str(caught.value))
        assert "run `%mp restart` (or Workbench.restart()) for fresh engines" in str(caught.value)
        wb.restart()
        assert wb.apply(_all_reduce_on_rank_0_only, stream=False) == [[2.0] * 4] * 2


def _log_text_that_is_not_ascii_then_much_more(state):
    """What an engine's own logging writes to the descriptors mpiexec reads: a warning with
    text outside ASCII, then more than the pipe holds; whether the writes got through."""
    import logging
    import sys
    import threading

    handler = logging.StreamHandler(sys.__stderr__)
    probe = logging.getLogger("mpbook-test-probe")
    probe.addHandler(handler)
    probe.propagate = False
    probe.warning("caf\u00e9 \U0001F680 from rank %d", state.rank)
    finished = []

    def more():  # 200 KiB: three times the 64 KiB a pipe holds
        for _ in range(2000):
            sys.__stderr__.write("x" * 99 + "\n")
        sys.__stderr__.write(f"rank {state.rank} wrote it all\n")
        sys.__stderr__.flush()
        finished.append(True)

    writer = threading.Thread(target=more, daemon=True)
    writer.start()
    writer.join(20)
    probe.removeHandler(handler)
    return bool(finished)


@pytest.mark.cluster
def test_an_mpi_engine_that_logs_text_outside_ascii_keeps_writing():
    """mpiexec.gforker stops reading a rank's output at its first byte over 0x7f (a signed-char
    comparison), after which the engine blocks once the pipe is full: its Python streams
    write ASCII, with the rest escaped, so the log keeps everything and nothing blocks."""
    import os

    with Workbench.start(2, cpu=True, transport="mpi") as wb:
        ipp_cluster = wb.cluster.ipp_cluster
        outputs = [launcher.output_file for engine_set in ipp_cluster.engines.values()
                   for launcher in [engine_set, *getattr(engine_set, "launchers", {}).values()]
                   if getattr(launcher, "output_file", "")]

        def logged() -> bytes:
            return b"".join(open(path, "rb").read() for path in outputs if os.path.isfile(path))

        # One rank at a time: gforker copies the ranks' output into one file in reads of up to
        # 1 KiB, so two ranks writing at once interleave in the middle of lines.
        for rank in range(2):
            assert wb.apply(_log_text_that_is_not_ascii_then_much_more, ranks=[rank], stream=False) == [True]
            deadline = time.monotonic() + 30
            while f"rank {rank} wrote it all".encode() not in logged() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert f"caf\\xe9 \\U0001f680 from rank {rank}".encode() in logged()
            assert f"rank {rank} wrote it all".encode() in logged()
        assert logged().isascii()
