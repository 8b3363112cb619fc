"""Pipeline parallelism: contiguous decoder layers per stage, micro-batches flow through.

The split is data: a list of ``range`` objects, one per stage, over the decoder layers.
The first stage also holds the token embedding, the last the final norm and the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MpbookError
from ..units import split_evenly


def split_layers(num_layers: int, pp: int, sizes: Sequence[int] | None = None) -> list[range]:
    """Layers per stage: balanced (earlier stages take the remainder) or as ``sizes`` says.

    >>> split_layers(6, 4)
    [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    """
    if pp > num_layers:
        raise MpbookError(
            f"pp={pp}: the model has {num_layers} decoder layers, so at most {num_layers} stages; "
            f"choose pp in 1..{num_layers}"
        )
    if sizes is None:
        return split_evenly(num_layers, pp)
    sizes = list(sizes)
    if len(sizes) != pp or any(s < 1 for s in sizes) or sum(sizes) != num_layers:
        raise MpbookError(
            f"stage sizes {sizes}: need {pp} sizes of at least 1 layer that add up to the "
            f"{num_layers} layers (they add up to {sum(sizes)})"
        )
    stages, start = [], 0
    for size in sizes:
        stages.append(range(start, start + size))
        start += size
    return stages


def balanced_stage_sizes(num_layers: int, pp: int, head_layers: float = 0.0) -> list[int]:
    """Layers per stage when none are asked for: balanced by the weights a decode step reads.

    A decode step is memory-bound and reads a stage's weights once per micro-batch, and the last
    stage also reads the LM head, a vocab x hidden matrix: ``head_layers`` decoder layers' worth
    (8 in a 30-layer 135M Llama with a 49,152-token vocabulary, whose equal split made the last
    stage 1.8x the others and left them waiting). So the last stage takes k layers and the others
    share the rest as :func:`split_layers` shares them, with k chosen so that the slowest stage
    (k + head_layers against the largest share) is as fast as it can be; on a tie, the k of the
    equal split. With a head smaller than half a layer that is the equal split.

    >>> balanced_stage_sizes(30, 3, 8.0), balanced_stage_sizes(6, 4, 0.68), balanced_stage_sizes(8, 2, 0.08)
    ([13, 12, 5], [2, 2, 1, 1], [4, 4])
    """
    split_layers(num_layers, pp)  # the check of pp against the layers
    if pp == 1:
        return [num_layers]
    even = num_layers // pp  # the last stage's layers in the equal split

    def slowest(k: int) -> float:
        return max(-(-(num_layers - k) // (pp - 1)), k + head_layers)

    k = min(range(1, num_layers - pp + 2), key=lambda k: (slowest(k), abs(k - even)))
    return [len(r) for r in split_evenly(num_layers - k, pp - 1)] + [k]


def default_microbatches(stages: int, rows: int, *, at_once: int | None = None) -> int:
    """Micro-batches per replica when none are asked for: one per stage (as many as rows
    allow), and no more than ``at_once``, the stages of one pipeline that can compute at the
    same time (None: every stage, each on its own GPU or cores; :func:`stages_at_once`).

    In decode a micro-batch's next step can start only when its token is back at the first
    stage, so with m < p micro-batches every stage idles (p - m) / p of each step; with m = p
    each stage always has one to work on. More than p buys nothing in decode and costs: a
    decode step is memory-bound, and a stage reads its weights once per micro-batch per step.
    (The prefill's fill and drain, (p-1)/(m+p-1) of it, shrinks with more; ask for them with
    ``--microbatches``.)

    Where the stages share fewer cores than they are (CPU engines that outnumber their host's
    cores), a micro-batch beyond those that can compute at once only takes turns on a core
    with another, and still reads its stage's weights again: measured on a 2-core VM (decode,
    interleaved rounds), 3 stages of ``small`` with 8 prompts decoded 463 tok/s with 2
    micro-batches against 356 with 3, and 2 replicas of 2 stages (4 engines) 575 with 1 against
    321 with 2; 3 stages of a 30-layer 135M Llama with 9 prompts, 81 against 70.

    >>> default_microbatches(2, 8), default_microbatches(4, 3), default_microbatches(1, 8)
    (2, 3, 1)
    >>> [default_microbatches(3, 8, at_once=2), default_microbatches(2, 8, at_once=2),
    ...  default_microbatches(2, 8, at_once=1)]
    [2, 2, 1]
    """
    most = max(1, min(stages, rows))
    return most if at_once is None else max(1, min(most, at_once))


def stages_at_once(layout, ranks_at_once: int | None) -> int | None:
    """How many stages of one pipeline of ``layout`` can compute at the same time, when only
    ``ranks_at_once`` ranks of the cluster can (None: all of them). A micro-batch in flight
    keeps one stage busy in every replica, each stage its tp x ep ranks.

    >>> from mpbook.layout import Layout
    >>> stages_at_once(Layout(pp=3), 2), stages_at_once(Layout(dp=2, pp=2), 2), stages_at_once(Layout(pp=2), None)
    (2, 1, None)
    """
    if ranks_at_once is None:
        return None
    return max(1, ranks_at_once // (layout.world_size // layout.pp))


def layout_microbatches(layout, rows: int, ranks_at_once: int | None = None) -> int:
    """A cell's default micro-batches per replica for ``layout``, ``rows`` prompts per replica,
    on a cluster of which ``ranks_at_once`` ranks can compute at the same time
    (:attr:`mpbook.cluster.Cluster.ranks_at_once`; None: all of them).

    >>> from mpbook.layout import Layout
    >>> [layout_microbatches(Layout(pp=3), 8, 2), layout_microbatches(Layout(dp=2, pp=2), 4, 2),
    ...  layout_microbatches(Layout(pp=3), 8)]
    [2, 1, 3]
    """
    return default_microbatches(layout.pp, rows, at_once=stages_at_once(layout, ranks_at_once))


def decode_bubble(stages: int, microbatches: int) -> float:
    """The share of a decode step each stage idles in steady state, under :func:`interleaved`:
    (p - m) / p when fewer micro-batches than stages, else 0."""
    return max(0, stages - microbatches) / stages


def interleaved_bubble(stages: int, microbatches: int, steps: int) -> float:
    """The idle share of ``steps`` decode steps under :func:`interleaved`, every (stage,
    micro-batch, step) of equal cost: the pipeline fills and drains once, (p-1) units over
    steps*m + p - 1 when m >= p; with m < p a micro-batch's token needs p units to come
    round, so a stage works m of every p units.

    >>> round(interleaved_bubble(2, 2, 1), 3), round(interleaved_bubble(2, 2, 31), 3), interleaved_bubble(2, 1, 10)
    (0.333, 0.016, 0.5)
    """
    p, m = stages, microbatches
    if p <= 1 or steps <= 0:
        return 0.0
    span = steps * m + p - 1 if m >= p else steps * p + m - 1
    return 1.0 - steps * m / span


class StagePeers:
    """Point-to-point transfers of one pipeline stage, counted in telemetry.

    Ranks of the same (dp, ep, tp) coordinates form one pipeline: stage s receives
    activations from stage s-1 and sends to s+1. In generation the last stage also sends
    each micro-batch's next tokens back to the first stage, which embeds them in the next step.

    A decode step's activation carries a one-element header in front of it: 1 while the
    micro-batch goes on, 0 once every row of it has finished. The first stage learns that
    from the count of rows going on that ends the tokens it receives, and the stages after it
    from the header, so a finished micro-batch leaves the pipeline without any message beyond
    those already sent.

    ``comm``: the engines' MPI world (:class:`mpbook.parallel.mpi.MpiComm`, ranked as mpbook
    ranks) when they share one; else the process group's own send and recv.
    """

    def __init__(self, pipeline_ranks: list[int], index: int, telemetry, *, comm=None):
        self.ranks = pipeline_ranks
        self.index = index  # this rank's stage, counted from 0
        self.stages = len(pipeline_ranks)
        self.telemetry = telemetry
        self.comm = comm
        self._pending: list = []

    @property
    def transport(self) -> str:
        if self.comm is not None:
            return "mpi"
        import torch.distributed as dist

        return dist.get_backend() if dist.is_initialized() else "none"

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def recv_activation(self, shape, dtype, device):
        return self._recv(self.ranks[self.index - 1], shape, dtype, device, "recv")

    def send_activation(self, tensor) -> None:
        self._send(self.ranks[self.index + 1], tensor, "send")

    def send_step(self, tensor, *, rows: int, hidden: int, dtype, device) -> None:
        """Send a decode step's activation, or (``tensor`` None) that the micro-batch ended."""
        import torch

        if tensor is None:
            message = torch.zeros(1 + rows * hidden, dtype=dtype, device=device)
        else:
            message = torch.cat([tensor.new_ones(1), tensor.reshape(-1)])
        self._send(self.ranks[self.index + 1], message, "send")

    def recv_step(self, rows: int, hidden: int, dtype, device):
        """A decode step's activation (rows, 1, hidden), or None when the micro-batch ended."""
        message = self._recv(self.ranks[self.index - 1], (1 + rows * hidden,), dtype, device, "recv")
        if message[0].item() == 0:
            return None
        return message[1:].view(rows, 1, hidden)

    def recv_tokens(self, rows: int, device):
        """The last stage's tokens for a micro-batch's next step, or None when none of its
        rows goes on."""
        import torch

        message = self._recv(self.ranks[-1], (rows + 1,), torch.long, device, "recv_tokens")
        if message[-1].item() == 0:
            return None
        return message[:-1]

    def send_tokens(self, tokens, *, going) -> None:
        """The tokens the last stage chose, and after them how many rows go on (``going``: a
        bool per row): the first stage needs no stop test of its own."""
        import torch

        self._send(self.ranks[0], torch.cat([tokens, going.sum().view(1)]), "send_tokens")

    def _recv(self, src: int, shape, dtype, device, kind: str):
        import torch

        buffer = torch.empty(shape, dtype=dtype, device=device)
        with self.telemetry.timed_collective(kind):
            if self.comm is not None:
                from .mpi import ACTIVATION_TAG, TOKENS_TAG

                self.comm.recv(buffer, src, TOKENS_TAG if kind == "recv_tokens" else ACTIVATION_TAG)
            else:
                import torch.distributed as dist

                dist.recv(buffer, src=src)
        return buffer

    def _send(self, dst: int, tensor, kind: str) -> None:
        # Sends do not wait: the sender moves on to its next micro-batch while this one is in
        # flight; the handle keeps the buffer alive until the send is done.
        tensor = tensor.contiguous()
        self._pending = [p for p in self._pending if not self._done(p)]
        with self.telemetry.timed_collective(kind):
            if self.comm is not None:
                from .mpi import ACTIVATION_TAG, TOKENS_TAG

                self._pending.append(self.comm.isend(tensor, dst, TOKENS_TAG if kind == "send_tokens" else ACTIVATION_TAG))
            else:
                import torch.distributed as dist

                self._pending.append((dist.isend(tensor, dst=dst), tensor))

    def _done(self, pending) -> bool:
        handle, _ = pending
        return handle.Test() if self.comm is not None else handle.is_completed()

    def drop_pending(self) -> None:
        """Forget the sends in flight without waiting (the run was interrupted)."""
        if self.comm is not None:
            for pending in self._pending:
                self.comm.abandon(pending)
        self._pending.clear()

    def flush(self) -> None:
        """Wait for every send in flight (end of a pass); the wait is timed, not counted."""
        import time

        if not self._pending:
            return
        began = time.perf_counter()
        for pending in self._pending:
            if self.comm is not None:
                self.comm.wait(pending)
            else:
                pending[0].wait()
        self._pending.clear()
        self.telemetry.collective("send", time.perf_counter() - began, n=0)


def fill_drain(microbatches, work, peers: StagePeers) -> None:
    """One GPipe pass: ``work(mb)`` for each micro-batch in order on this stage, then wait for
    the sends in flight. Stage s starts micro-batch j as soon as stage s-1 hands it over, so
    the stages overlap on different micro-batches; the pipeline fills and drains once per
    pass (the bubble: (p-1)/(m+p-1) of the pass for p stages and m micro-batches)."""
    for mb in microbatches:
        work(mb)
    peers.flush()


def interleaved(microbatches, steps: range, work, peers: StagePeers) -> None:
    """Decode without draining: ``work(mb, step)`` round-robin over the micro-batches still
    going (mb 0 step 1, mb 1 step 1, ..., mb 0 step 2, ...), the same order on every stage,
    and nothing waits at a step's end. A micro-batch starts its next step as soon as its
    token is back at the first stage, while the others are still in flight on later stages,
    so with as many micro-batches as stages no stage waits (:func:`decode_bubble`); the
    pipeline fills and drains once per generation, not once per token."""
    for step in steps:
        going = [mb for mb in microbatches if mb.alive]
        if not going:
            break
        for mb in going:
            work(mb, step)
    peers.flush()
