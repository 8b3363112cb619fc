"""Collectives between CPU engines of one MPI world: mpi4py over MPICH's shared memory.

Why: gloo moves a few KiB between two processes on one host in about a millisecond (TCP over
loopback); MPICH's shared-memory all-reduce takes a few microseconds. Tensor parallel pays
two all-reduces per layer per token, so on CPU engines the transport decides whether tp
gains anything at all. Engines share an MPI world when ipyparallel's MPI launcher started
them with ``mpiexec`` (:mod:`mpbook.cluster.transport`); the process group (gloo) stays up
beside it for everything else (``%%mp run`` cells, DTensor, the fallback).

Every wait is a poll: the nonblocking call (``Iallreduce``, ``Isend``, ...), then ``Test``
until it completes, which is as fast as the blocking call here (measured: 4 us vs 5 us at
8 KiB). A blocking MPI call would hold its thread in C until the peer comes: Ctrl-C could
not reach an engine waiting for a peer that has already stopped, and a peer that never comes
would hang the cell forever. Polled, an interrupt ends the wait at once and a missing peer
is reported after the cluster's timeout, as gloo reports it. Either leaves this
communicator's messages out of step, so a communicator that raised is never used again: the
client forms the group again after any failed or interrupted run, and the engines split
fresh communicators from the world then (:func:`world`). The old ones are not freed: MPICH
reuses a freed communicator's context id at once, and a message of the old run still
unmatched (a departure's word, the activation sent to a stage that failed to load) would
then be taken by the new one, which is the very thing fresh communicators prevent (tried:
the interrupt tests then saw the previous run's departures). An MPICH process holds 2048
(:func:`split` says so when they are spent); each formation takes two, and a layout's mesh
one per group it uses.

A rank interrupted alone leaves its peers waiting for it in shared memory, where nothing
tells them it has gone (gloo's peers see its connections close). So a rank that leaves a
run tells every other rank so, on a communicator of its own (:class:`Departures`), and a
wait for a peer that has left ends at once with :class:`PeerLeft`, which that rank passes on
in turn, so the ranks waiting for *it* end too.

CPU tensors only: each is handed to MPI as the numpy array sharing its memory. MPI has no
bfloat16, so half-precision tensors travel bit for bit as int16 and are summed in float32.
"""

from __future__ import annotations

import array
import os
import time
from typing import Any

from ..errors import MpbookError

# Tags of point-to-point messages between pipeline stages (one message stream per kind, so
# that a stage that both receives tokens and activations never mistakes one for the other).
ACTIVATION_TAG, TOKENS_TAG = 1, 2
COMMUNICATORS_PER_PROCESS = 2048  # MPICH's context ids per process
# A wait polls flat out for a moment (a peer a few microseconds behind), then yields the core
# between polls (more engines than cores: the peer may need this very core to arrive), then
# sleeps between polls (a peer still computing a layer, or a pipeline stage still busy).
SPIN_TESTS = 200
YIELD_TESTS = 2000
WAIT_SLEEP_S = 50e-6

# Requests this process gave up waiting for (an interrupt, a timeout, a peer that left) or
# never waits for (the departures' word), with the buffers MPI was handed, for as long as MPI
# may use them. Ending a wait does not end the request: it stays posted on its communicator
# (which is never freed, above), and any later MPI call of this process may complete it, when
# the peer's half arrives, and write into its buffer. Held by the communicator's object, a
# buffer was freed with it when the group was formed again: MPI's late write then corrupted the
# heap (seen: an engine of a tensor-parallel run interrupted on one rank died in glibc's
# unlink_chunk). Dropped once MPI has completed them (:func:`release_completed`); the departures'
# receive of each formation stays posted for good (8 bytes each, a formation's two communicators
# bound their number).
_IN_FLIGHT: list = []


def hold_until_complete(request, buffers) -> None:
    """Keep ``buffers`` alive until MPI has completed ``request`` (looked at when the group is
    formed again)."""
    _IN_FLIGHT.append((request, buffers))


def release_completed() -> int:
    """Drop the held requests MPI has completed (their buffers are free to go); how many are
    still held. Called as the group is formed, when no run's requests are waited for."""
    _IN_FLIGHT[:] = [(request, buffers) for request, buffers in _IN_FLIGHT if not request.Test()]
    return len(_IN_FLIGHT)


# Where MPICH must not open sockets: only the shared-memory transport between processes of
# one host (UCX's sm and self), so no rank listens on any network interface.
LOCAL_ONLY_ENV = {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "sm,self", "UCX_NET_DEVICES": "lo"}


class CollectiveTimeout(RuntimeError):
    """A peer did not take part in an MPI collective within the cluster's timeout."""


class PeerLeft(RuntimeError):
    """A peer of an MPI wait left the run (interrupted, or it left because its own peer did)."""


def in_mpi_world() -> tuple[int, int] | None:
    """(rank, size) in the MPI world this process was started in by mpiexec, else None.

    Read from the process manager's environment, before importing mpi4py: importing it
    initializes MPI, which a process outside any MPI world need not pay for."""
    rank, size = os.environ.get("PMI_RANK"), os.environ.get("PMI_SIZE")
    if rank is None or size is None:
        return None
    return int(rank), int(size)


def world(rank: int, *, timeout_s: float) -> MpiComm:
    """A fresh communicator over the whole MPI world, ranked as mpbook ranks the engines.

    Collective over the world: every engine calls it once each time the group is formed.
    The world itself carries no data, so it is never out of step."""
    from mpi4py import MPI

    release_completed()
    comm = split(MPI.COMM_WORLD, 0, rank)
    departures = Departures(split(MPI.COMM_WORLD, 0, rank))
    return MpiComm(comm, timeout_s=timeout_s, members=list(range(comm.Get_size())), departures=departures)


def split(comm, color: int, key: int):
    """``comm.Split(color, key)``; when MPICH has no communicator left to give this process,
    an error that says why and what to do."""
    from mpi4py import MPI

    try:
        return comm.Split(color, key)
    except MPI.Exception as exc:
        if "Too many communicators" not in str(exc):
            raise
        raise MpbookError(
            f"this engine holds all {COMMUNICATORS_PER_PROCESS} MPI communicators MPICH gives a process (the group "
            "takes two more each time it is formed again, after an interrupt or a failed collective, and each layout "
            "one per group it uses); run `%mp restart` (or Workbench.restart()) for fresh engines"
        ) from None


class Departures:
    """Word of the ranks that left the run, on a communicator that carries nothing else.

    Each rank keeps a receive from any rank posted; a rank that leaves sends its rank to
    every other. Only a wait that polls past its first spin asks (a Test, a microsecond), so
    the collectives' fast path pays nothing."""

    def __init__(self, comm: Any):
        from mpi4py import MPI

        self.comm = comm
        self.rank = comm.Get_rank()  # the world's ranks are mpbook's (world() splits by rank)
        self.left: set[int] = set()
        self._any = MPI.ANY_SOURCE
        self._news = array.array("q", [0])  # a rank's number: any buffer will do for MPI
        self._receiving = self._receive()
        self._announced = False

    def _receive(self):
        # Posted until a word comes, which may be after this run's objects are gone (a peer's
        # word of an interrupted run, arriving as the group is formed again): held process-wide.
        request = self.comm.Irecv(self._news, source=self._any)
        hold_until_complete(request, self._news)
        return request

    def check(self) -> set[int]:
        """The ranks known to have left so far."""
        while self._receiving.Test():
            self.left.add(int(self._news[0]))
            self._receiving = self._receive()
        return self.left

    def announce(self) -> None:
        """Tell every other rank that this one has left the run (once; without waiting)."""
        if self._announced:
            return
        self._announced = True
        for other in range(self.comm.Get_size()):
            if other != self.rank:
                news = array.array("q", [self.rank])
                hold_until_complete(self.comm.Isend(news, dest=other), news)


class MpiComm:
    """One MPI communicator with the operations mpbook's collectives need, on CPU tensors."""

    def __init__(self, comm: Any, *, timeout_s: float, members: list[int] | None = None,
                 departures: Departures | None = None):
        from mpi4py import MPI

        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM  # looked up once: a decode step makes dozens of calls
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout_s = timeout_s
        self.members = members if members is not None else list(range(self.size))  # world ranks, in comm order
        self.departures = departures

    def split(self, color: int, key: int) -> MpiComm:
        """A sub-communicator of the ranks that pass the same ``color``, ranked by ``key``
        (collective: every rank of this communicator calls it)."""
        from mpi4py import MPI

        sub = split(self.comm, color, key)
        # where each of its ranks sits in this communicator, hence in the world
        sub_group, own_group = sub.Get_group(), self.comm.Get_group()
        here = MPI.Group.Translate_ranks(sub_group, list(range(sub.Get_size())), own_group)
        sub_group.Free()
        own_group.Free()
        return MpiComm(sub, timeout_s=self.timeout_s, members=[self.members[r] for r in here],
                       departures=self.departures)

    def leave(self) -> None:
        """This rank leaves the run (interrupted): every rank waiting for it stops waiting."""
        if self.departures is not None:
            self.departures.announce()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor):
        """The sum over the communicator, in place (``tensor`` is contiguous)."""
        if tensor.is_floating_point() and tensor.element_size() == 2:  # bf16, fp16: MPI sums neither; in float32
            wide = tensor.float()
            self._wait(self.comm.Iallreduce(self._in_place, wide.numpy(), op=self._sum), wide, "all_reduce")
            tensor.copy_(wide)
            return tensor
        self._wait(self.comm.Iallreduce(self._in_place, tensor.numpy(), op=self._sum), tensor, "all_reduce")
        return tensor

    def all_gather(self, tensor):
        """Every rank's ``tensor`` (equal shapes), stacked on a new leading dim in rank order."""
        import torch

        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        self._wait(self.comm.Iallgather(_array(tensor), _array(out)), (tensor, out), "all_gather")
        return out

    def gather(self, tensor, root: int = 0):
        """Every rank's ``tensor`` stacked on ``root`` (None on the others)."""
        import torch

        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype) if self.rank == root else None
        self._wait(self.comm.Igather(_array(tensor), _array(out) if out is not None else None, root=root),
                   (tensor, out), "gather")
        return out

    def broadcast(self, tensor, root: int = 0):
        """``root``'s ``tensor`` on every rank, in place."""
        self._wait(self.comm.Ibcast(_array(tensor), root=root), tensor, "broadcast")
        return tensor

    # ------------------------------------------------------------------ point to point
    def isend(self, tensor, dest: int, tag: int):
        """Start sending ``tensor`` (kept alive by the returned handle until :meth:`wait`)."""
        return (self.comm.Isend(_array(tensor), dest=dest, tag=tag), tensor)

    def recv(self, buffer, source: int, tag: int):
        self._wait(self.comm.Irecv(_array(buffer), source=source, tag=tag), buffer, "recv")
        return buffer

    def wait(self, pending) -> None:
        request, tensor = pending
        self._wait(request, tensor, "send")

    def abandon(self, pending) -> None:
        """A send that will not be waited for (the run was interrupted)."""
        hold_until_complete(*pending)

    # ------------------------------------------------------------------ waiting
    def _wait(self, request, buffers, what: str) -> None:
        """Poll ``request`` until it completes; Ctrl-C and the timeout end the wait."""
        try:
            tests = 0
            while not request.Test():
                tests += 1
                if tests < SPIN_TESTS:
                    continue
                if tests == SPIN_TESTS:
                    deadline = time.monotonic() + self.timeout_s
                self._raise_if_a_peer_left(what)
                if tests < YIELD_TESTS:
                    os.sched_yield()
                    continue
                time.sleep(WAIT_SLEEP_S)
                if time.monotonic() > deadline:
                    raise CollectiveTimeout(
                        f"MPI {what} timed out waiting for its peers after {self.timeout_s:g} s "
                        f"(rank {self.rank} of {self.size} in its communicator)"
                    )
        except BaseException:
            hold_until_complete(request, buffers)
            raise

    def _raise_if_a_peer_left(self, what: str) -> None:
        if self.departures is None:
            return
        gone = sorted(self.departures.check().intersection(self.members))
        if gone:
            # This rank leaves too: the ranks waiting for it (in other communicators) stop now.
            self.departures.announce()
            raise PeerLeft(f"MPI {what}: rank {', '.join(map(str, gone))} left the run (interrupted), so this "
                           f"{what} cannot complete (rank {self.rank} of {self.size} in its communicator)")

    def __repr__(self) -> str:
        return f"MpiComm(rank {self.rank} of {self.size})"


def _array(tensor):
    """The numpy array sharing ``tensor``'s memory (half precision as raw int16)."""
    import torch

    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    elif tensor.dtype == torch.bool:
        tensor = tensor.view(torch.uint8)
    return tensor.numpy()
