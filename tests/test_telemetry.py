"""Telemetry on real engines: snapshots published while a task runs, running totals, phases."""

from __future__ import annotations

import threading
import time

import pytest

from mpbook.cluster import calls as remote
from mpbook.engine import publish
from mpbook.engine import group
from mpbook.compat.ipyparallel import target_metadata
from mpbook.protocol import TELEMETRY_LATEST, TELEMETRY_START
from mpbook.engine.telemetry import Telemetry

# A cell that walks through the phases a generation goes through, reporting as a strategy would.
PHASES_CELL = """
import time
with telemetry.phase_scope("loading"):
    time.sleep(0.6)
with telemetry.phase_scope("prefill"):
    time.sleep(0.6)
    telemetry.add_tokens("prefill", 32)
with telemetry.phase_scope("decode"):
    for _ in range(12):
        time.sleep(0.1)
        telemetry.add_tokens("decode", 2)
        with telemetry.timed_collective("all_reduce"):
            t = torch.ones(1)
            dist.all_reduce(t)
"""


def _collect(result, ranks):
    """Wait on ``result`` and keep every distinct snapshot each rank published meanwhile."""
    seen: dict[int, list[dict]] = {r: [] for r in ranks}

    def tick():
        for rank, md in zip(ranks, target_metadata(result)):
            snap = (md.get("data") or {}).get(TELEMETRY_LATEST)
            if snap and (not seen[rank] or snap["time"] > seen[rank][-1]["time"]):
                seen[rank].append(snap)

    began = time.monotonic()
    remote.wait(result, ranks, stream=False, on_tick=tick)
    return seen, time.monotonic() - began


def test_a_cell_publishes_increasing_totals_and_its_phases(workbench):
    before = workbench.apply(lambda s: s.telemetry.snapshot(), stream=False)
    result = workbench.client[workbench.engine_ids()].execute(PHASES_CELL, silent=False, block=False)
    seen, seconds = _collect(result, workbench.ranks)
    for rank in workbench.ranks:
        snaps = seen[rank]
        # at least twice a second while the cell ran (four are sent; a loaded machine may lose some ticks)
        assert len(snaps) >= 2 * int(seconds), (rank, len(snaps), seconds)
        totals = [sum(s["tokens"].values()) for s in snaps]
        assert totals == sorted(totals) and totals[-1] > totals[0]
        coll = [s["collective_seconds"] for s in snaps]
        assert coll == sorted(coll)
        # the phases show up in the order the cell went through them, and it ends idle
        phases = [s["phase"] for s in snaps]
        order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
        assert [p for p in order if p != "idle"] == ["loading", "prefill", "decode"], phases
        last = snaps[-1]
        assert last["phase"] == "idle"
        # running totals: exactly what the cell added on top of what was there before
        assert last["tokens"]["prefill"] - before[rank]["tokens"].get("prefill", 0) == 32
        assert last["tokens"]["decode"] - before[rank]["tokens"].get("decode", 0) == 24
        assert last["collectives"]["all_reduce"] - before[rank]["collectives"].get("all_reduce", 0) == 12
        assert last["collective_seconds"] > before[rank]["collective_seconds"]
        assert last["phase_seconds"]["loading"] >= 0.6 and last["phase_seconds"]["prefill"] >= 0.6
        # CPU engines: memory is the process's RSS, peak at least that
        memory = last["memory"]
        assert memory["in_use"] > 50 * 2**20 and memory["peak"] >= memory["in_use"]
        # ... measured against the host's memory, the capacity a CPU engine has
        assert memory["reserved"] is None and memory["device_total"] > max(memory["device_used"], memory["in_use"])
        assert (last["rank"], last["device"]) == (rank, "cpu")
        # the baseline snapshot taken as the cell began is kept under its own key
        start = target_metadata(result)[rank]["data"][TELEMETRY_START]
        assert sum(start["tokens"].values()) == sum(before[rank]["tokens"].values())


def _phases_via_state(state, steps):
    import time

    tel = state.telemetry
    with tel.phase_scope("prefill"):
        time.sleep(0.4)
        tel.add_tokens("prefill", 8)
    with tel.phase_scope("decode"):
        for _ in range(steps):
            time.sleep(0.1)
            tel.add_tokens("decode", 1)
    tel.note_memory("weights", 1234)
    return state.publisher.published


def test_an_apply_publishes_through_state_telemetry(workbench):
    result = workbench.client[workbench.engine_ids()].apply_async(group.call, _phases_via_state, 10)
    seen, seconds = _collect(result, workbench.ranks)
    for rank in workbench.ranks:
        phases = {s["phase"] for s in seen[rank]}
        assert {"prefill", "decode"} <= phases
        decode = [s["tokens"].get("decode", 0) for s in seen[rank]]
        assert decode == sorted(decode) and len(set(decode)) >= 3
        assert seen[rank][-1]["memory_parts"]["weights"] == 1234


def test_nothing_is_published_between_tasks(workbench):
    def published(state):
        return state.publisher.published

    workbench.run("import time; time.sleep(0.6)", stream=False)
    first = workbench.apply(published, stream=False)
    time.sleep(1.0)
    second = workbench.apply(published, stream=False)
    # each apply is itself a task: its start and final snapshot, no more
    assert [b - a for a, b in zip(first, second)] == [2, 2]


def test_an_error_in_the_cell_still_ends_the_task_with_a_final_snapshot(workbench):
    result = workbench.client[workbench.engine_ids()].execute(
        "with telemetry.phase_scope('decode'):\n    telemetry.add_tokens('decode', 5)\n    1 / 0", silent=False, block=False
    )
    with pytest.raises(Exception, match="ZeroDivisionError"):
        _collect(result, workbench.ranks)
    for md in target_metadata(result):
        assert md["data"][TELEMETRY_LATEST]["phase"] == "idle"
    # the failed cell's task is closed: inside the next call, that call is the only task
    assert workbench.apply(lambda s: s.publisher._depth, stream=False) == [1, 1]


# ----------------------------------------------------------------- the publisher's thread
def test_publisher_sends_while_a_task_runs_and_stops_at_its_end():
    sent: list[tuple[str, float]] = []
    lock = threading.Lock()

    def send(key, snap):
        with lock:
            sent.append((key, snap["t"]))

    pub = publish.Publisher(lambda: {"t": time.monotonic()}, period_s=0.05, send=send)
    try:
        with pub.task():
            with pub.task():  # nested: one task
                time.sleep(0.5)
        ended = time.monotonic()
        time.sleep(0.3)
        keys = [k for k, _ in sent]
        assert keys[0] == TELEMETRY_START and keys.count(TELEMETRY_START) == 1
        assert keys.count(TELEMETRY_LATEST) >= 5
        # the final snapshot is the last one, and nothing left after the task ended
        assert all(t <= ended for _, t in sent)
        n = len(sent)
        pub.enabled = False
        with pub.task():
            time.sleep(0.2)
        assert len(sent) == n
    finally:
        pub.close()
    assert not pub._thread.is_alive()


def test_a_failing_snapshot_never_hurts_the_task(caplog):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no NVML here")

    pub = publish.Publisher(broken, period_s=0.02, send=lambda k, s: None)
    try:
        with caplog.at_level("WARNING", logger="mpbook.publish"):
            with pub.task():
                time.sleep(0.2)
    finally:
        pub.close()
    assert len(calls) >= 3
    assert [r.message for r in caplog.records].count("mpbook could not publish a telemetry snapshot") == 1


def test_note_memory_and_collective_time_by_kind():
    import torch

    tel = Telemetry(0, torch.device("cpu"))
    tel.note_memory("kv_cache", 10)
    tel.collective("all_gather", 0.25)
    tel.collective("all_gather", 0.25)
    snap = tel.snapshot()
    assert snap["memory_parts"] == {"kv_cache": 10}
    assert snap["collective_seconds_by_kind"] == {"all_gather": 0.5}
    assert snap["replica"] == 0
    # time alone (waiting on sends counted already) adds no count of 0
    with tel.run() as stats:
        tel.collective("send", 0.5, n=0)
    snap = tel.snapshot()
    assert snap["collectives"] == {"all_gather": 2} and dict(stats.collectives) == {}
    assert snap["collective_seconds"] == 1.0 and stats.collective_seconds == 0.5
    with pytest.raises(ValueError, match="unknown memory part 'kv'"):
        tel.note_memory("kv", 1)


def test_a_runs_phases_are_its_own_time_not_the_wait_before_it():
    import time

    import torch

    tel = Telemetry(0, torch.device("cpu"))
    time.sleep(0.2)  # idle between calls
    with tel.run() as stats:
        tel.set_phase("prefill")
        time.sleep(0.05)
        tel.set_phase("decode")
        time.sleep(0.05)
    assert stats.phase_seconds["idle"] < 0.05
    assert stats.phase_seconds["prefill"] >= 0.05 and stats.phase_seconds["decode"] >= 0.05
    assert tel.snapshot()["phase_seconds"]["idle"] >= 0.2  # the engine's own totals keep it


@pytest.mark.gpu
def test_cuda_snapshot_has_allocator_and_nvml_memory():
    from mpbook import Workbench

    def allocate(state):
        import torch

        state.cache["x"] = torch.empty(256 * 2**20, dtype=torch.uint8, device=state.device)
        snap = state.telemetry.snapshot()
        return snap, int(torch.cuda.memory_allocated(state.device))

    with Workbench.start(1, gpu=True) as wb:
        [(snap, allocated)] = wb.apply(allocate, stream=False)
    memory = snap["memory"]
    assert memory["in_use"] == allocated >= 256 * 2**20
    assert memory["reserved"] >= memory["in_use"] and memory["peak"] >= memory["in_use"]
    assert memory["device_total"] > memory["device_used"] >= memory["reserved"]


MiB = 2**20


def _run_holding(state, mib: int):
    """One run (as a strategy brackets it) that holds ``mib`` MiB at its height, then frees them."""
    import torch

    with state.telemetry.run() as stats:
        if mib:
            block = torch.ones(mib * MiB // 4)  # written, so resident
            del block  # a block this large is returned to the system at once
    return stats.peak_memory_bytes


def test_the_memory_peak_is_each_runs_and_each_cells_own(workbench, tiny_folder):
    """A run that held 400 MiB, then runs that held nothing: their peaks are their own, not the
    process's peak since it started (CPU engines: the kernel's peak RSS, reset as each begins)."""
    from mpbook.dashboard import Dashboard

    def generate():
        return workbench.generate(["Hi there", "What is a tensor?"], strategy="pipeline", model=tiny_folder,
                                  max_new_tokens=4)

    generate()  # transformers imported and the model loaded: what the process holds from now on
    big = workbench.apply(_run_holding, 400, stream=False)
    small = workbench.apply(_run_holding, 0, stream=False)
    for high, low in zip(big, small):
        assert high - low > 300 * MiB, (high, low)
    result = generate()
    for high, peak in zip(big, result.peak_memory_bytes):
        assert 0 < peak < high - 300 * MiB, (high, peak)
    assert "peak memory per rank in this run (process RSS): [" in result.summary()
    # the dashboard's peak is the cell's own too: each task starts it afresh
    peaks = []
    for code in ("block = torch.ones(100 * 2**20); del block", "x = rank"):
        dash = Dashboard(workbench, mode="widget")
        workbench.run(code, dashboard=dash)
        peaks.append([dash.tracks[r].latest["memory"]["peak"] for r in workbench.ranks])
    for high, low in zip(*peaks):
        assert high - low > 300 * MiB, peaks


# --------------------------------------------------------------------------- collective time
def test_a_collective_on_a_cpu_is_timed_by_the_host_clock(monkeypatch):
    import torch

    def no_event(*args, **kwargs):
        raise AssertionError("a CPU engine's collective asked for a CUDA event")

    monkeypatch.setattr(torch.cuda, "Event", no_event)
    tel = Telemetry(0, torch.device("cpu"))
    with tel.run() as stats:
        with tel.timed_collective("all_reduce"):
            time.sleep(0.05)
    assert 0.05 <= stats.collective_seconds < 1.0 and dict(stats.collectives) == {"all_reduce": 1}
    assert tel.collective_seconds == stats.collective_seconds
    assert tel.host_collective_seconds_by_kind == tel.collective_seconds_by_kind == {"all_reduce": stats.collective_seconds}


class _StandInEvent:
    """What the telemetry asks of a CUDA event, for the bookkeeping without a GPU: the test
    says when the device passes it (``passed``) and at what device time (ms)."""

    def __init__(self, enable_timing=False):
        self.ms = None
        self.passed = False

    def record(self, stream=None):
        self.recorded = stream

    def query(self):
        return self.passed

    def synchronize(self):
        self.passed = True

    def elapsed_time(self, end):
        return end.ms - self.ms


def test_gpu_collectives_are_counted_at_once_and_timed_when_the_device_passes_them(monkeypatch):
    import torch

    events: list[_StandInEvent] = []

    def event(enable_timing=False):
        events.append(_StandInEvent(enable_timing))
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    tel = Telemetry(0, torch.device("cuda", 0))
    for kind in ("all_reduce", "all_gather", "all_reduce"):
        with tel.timed_collective(kind):
            pass  # queued: the host is back at once
    assert tel.collectives == {"all_reduce": 2, "all_gather": 1} and tel.collective_seconds == 0.0
    assert all(e.recorded == "stream" for e in events)
    # the device passes the first two: their device time is added, in order; the third waits
    for i, ms in enumerate((0.0, 30.0, 40.0, 100.0, 100.0, 150.0)):
        events[i].ms = ms
    events[1].passed = events[3].passed = True
    tel.settle_collectives()
    assert tel.collective_seconds_by_kind == {"all_reduce": 0.03, "all_gather": 0.06}
    tel.settle_collectives(wait=True)  # the end of a run: wait for the device
    assert tel.collective_seconds_by_kind == pytest.approx({"all_reduce": 0.08, "all_gather": 0.06})
    assert tel.host_collective_seconds_by_kind["all_reduce"] < 0.01  # the host only queued them
    # a failed run gives up what the device has not passed: counted, never timed
    with tel.timed_collective("broadcast"):
        pass
    tel.settle_collectives(give_up=True)
    assert tel.collectives["broadcast"] == 1 and tel.collective_seconds_by_kind["broadcast"] == 0.0
    tel.settle_collectives(wait=True)  # nothing left to wait for


@pytest.mark.gpu
def test_a_collective_on_a_gpu_is_timed_by_cuda_events_not_its_launch():
    import torch

    device = torch.device("cuda", 0)
    tel = Telemetry(0, device)
    a = torch.randn(8192, 8192, device=device)
    torch.cuda.synchronize(device)
    with tel.run() as stats:
        began = time.perf_counter()
        with tel.timed_collective("all_reduce"):
            for _ in range(20):  # queued: the device works through them (tens of ms), the host goes on
                b = a @ a
        launched = time.perf_counter() - began
        assert dict(stats.collectives) == {"all_reduce": 1}  # counted at once
    del b
    assert stats.collective_seconds >= 0.02 and launched < 0.5 * stats.collective_seconds
    assert tel.collective_seconds_by_kind["all_reduce"] == stats.collective_seconds
    assert tel.host_collective_seconds_by_kind["all_reduce"] <= launched
