"""Interrupting one rank alone (``Workbench.interrupt(ranks=[r])``, from another thread) mid-
generation: the ranks in a collective with it end too, within 3 s, not after the collective
timeout (60 s), and the next run gives one device's tokens.

Over MPI the peers wait for the interrupted rank in shared memory, where no connection
closes: it tells them it has left (:class:`mpbook.parallel.mpi.Departures`), and a rank that
stops because its peer left tells its own peers in turn (pp=2 x tp=2 needs that: rank 3
waits only on ranks 1 and 2). Over gloo the interrupted rank ends its connections.
"""

from __future__ import annotations

import threading
import time

import pytest

from mpbook import RankError
from mpbook.reference import reference

pytestmark = pytest.mark.cluster

MODEL = "small"
LONG = ["Hello there", "What is a tensor?"]
SHORT = ["Hello there"]
INTERRUPT_AFTER_S = 1.5


def interrupted_alone(wb, rank: int, **layout) -> tuple[float, RankError]:
    """Seconds from interrupting ``rank`` alone to the end of the run, and the run's error."""
    wb.generate(SHORT, model=MODEL, max_new_tokens=2, **layout)  # loaded: the interrupt lands in the decode
    return interrupted_run(wb, [rank], **layout)


def interrupted_run(wb, ranks, **layout) -> tuple[float, RankError]:
    interrupted = []

    def interrupt() -> None:
        interrupted.append(time.monotonic())
        wb.interrupt(ranks=ranks)

    timer = threading.Timer(INTERRUPT_AFTER_S, interrupt)
    timer.start()
    try:
        with pytest.raises(RankError) as info:
            wb.generate(LONG, model=MODEL, max_new_tokens=900, ignore_eos=True, **layout)
        ended = time.monotonic()
    finally:
        timer.cancel()
    assert interrupted, "the run ended before the interrupt"
    return ended - interrupted[0], info.value


def check_the_next_run(wb, **layout) -> None:
    began = time.monotonic()
    after = wb.generate(SHORT, model=MODEL, max_new_tokens=4, **layout)
    took = time.monotonic() - began
    assert after.token_ids == reference(MODEL, SHORT, max_new_tokens=4)[1]
    assert took < 15, f"the next run took {took:.1f} s"
    print(f"; the next run {took:.2f} s")


@pytest.mark.parametrize("strategy, rank", [("tensor", 1), ("pipeline", 0)])
def test_one_rank_interrupted_over_mpi_ends_the_run_within_3_s(workbench, strategy, rank):
    took, error = interrupted_alone(workbench, rank, strategy=strategy)
    print(f"\n{strategy} over {workbench.engines[0].transport}, rank {rank} interrupted alone: the run ended "
          f"{took:.2f} s later ({error})", end="")
    assert [f.rank for f in error.failures if f.ename == "KeyboardInterrupt"] == [rank], error
    others = ", ".join(str(r) for r in range(workbench.world_size) if r != rank)
    assert str(error).startswith(f"the {strategy} run was interrupted on rank {rank} (KeyboardInterrupt); "
                                 f"rank {others} stopped with it: "), error
    assert took < 3.0, f"the run ended {took:.1f} s after the interrupt (the collective timeout is 60 s)"
    check_the_next_run(workbench, strategy=strategy)


def test_one_rank_interrupted_over_gloo_ends_the_run_within_3_s(gloo_workbench):
    took, error = interrupted_alone(gloo_workbench, 1, strategy="tensor")
    print(f"\ntensor over gloo, rank 1 interrupted alone: the run ended {took:.2f} s later", end="")
    assert took < 3.0, f"the run ended {took:.1f} s after the interrupt: {error}"
    check_the_next_run(gloo_workbench, strategy="tensor")


def test_the_ranks_waiting_for_a_peer_that_stopped_stop_too(wb4):
    """pp=2 x tp=2, rank 0 interrupted: rank 1 (its tp peer) and rank 2 (its next stage) stop
    because it left; rank 3 waits only on those two, and stops because they did."""
    layout = dict(strategy="tensor", pp=2, tp=2)
    took, error = interrupted_alone(wb4, 0, **layout)
    print(f"\npp=2 x tp=2 over {wb4.engines[0].transport}, rank 0 interrupted alone: the run ended {took:.2f} s "
          f"later; {[(f.rank, f.ename) for f in error.failures]}", end="")
    assert took < 3.0, f"the run ended {took:.1f} s after the interrupt: {error}"
    check_the_next_run(wb4, **layout)
