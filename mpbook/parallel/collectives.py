"""One process group with the collectives the parallel styles need, each counted in telemetry.

Every collective of tensor, expert and vocab parallelism goes through a :class:`Group`, so a
run can say how many of each kind a forward pass needed (the dashboard's and the result's
``collectives``). Plain local tensors only: no DTensor dispatch on the hot path.

A group moves its tensors over one of two transports: the process group's own backend (gloo
on CPU engines, NCCL on GPUs), or, when the engines share an MPI world, an MPI communicator
over the same ranks (:mod:`mpbook.parallel.mpi`), microseconds instead of a millisecond per
call between CPU engines on one host. ``transport`` says which.

Under ``torch.compile`` (``--compile``, :mod:`mpbook.engine.compiled`) the collectives a
layer calls in its forward, the all-reduce and the all-gather, are custom operators
(``torch.ops.mpbook.*``): one opaque node each in the compiled graph, so a tensor-parallel
step compiles whole instead of in pieces between them; they run the same code at run time,
meet the other ranks' in the same order, over the same transport, and are counted as always.
The rest are never traced (``not_traced``).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

# A collective outside a layer's forward: a compiled step ends its graph before it.
not_traced = torch.compiler.disable

# The groups a compiled graph calls by number (a graph holds ints, not Python objects). A
# graph's guards hold the number too, so it stands for what the group is (its ranks, this
# rank's place, whether it counts, its transport), not for one Group object: a model loaded
# again (another layout in between, every round of `bench --compile`) or a group formed again
# gets the number its graphs already have, and they run without compiling again. A graph
# calls whichever group of that number was made last, the one the loaded model holds (two
# alive at once with one number are the same ranks over the same transport: either serves).
_GROUPS: weakref.WeakValueDictionary[int, Group] = weakref.WeakValueDictionary()
_NUMBERS: dict[tuple, int] = {}


@torch.library.custom_op("mpbook::all_reduce", mutates_args=())
def _all_reduce_op(tensor: torch.Tensor, group: int) -> torch.Tensor:
    return _GROUPS[group].eager_all_reduce(tensor.clone())  # a new tensor: the op's input stays as it was


@_all_reduce_op.register_fake
def _(tensor, group):
    return torch.empty_like(tensor)


@torch.library.custom_op("mpbook::all_gather_last_dim", mutates_args=())
def _all_gather_last_dim_op(local: torch.Tensor, group: int, sizes: list[int]) -> torch.Tensor:
    return _GROUPS[group].eager_all_gather_last_dim(local, sizes)


@_all_gather_last_dim_op.register_fake
def _(local, group, sizes):
    return local.new_empty((*local.shape[:-1], sum(sizes)))


class Group:
    """This rank's place in one process group: ``rank`` of ``size``.

    ``telemetry``: an engine's :class:`mpbook.engine.telemetry.Telemetry` (or anything with
    ``timed_collective(kind)``); None counts nothing (unit tests)."""

    def __init__(self, group: Any, *, rank: int, size: int, telemetry: Any = None, ranks: list[int] | None = None,
                 comm: Any = None):
        self.group = group
        self.rank = rank
        self.size = size
        self.telemetry = telemetry
        self.ranks = ranks  # the global ranks of the group, in group order (for gather's destination)
        self.comm = comm  # an mpbook.parallel.mpi.MpiComm over the same ranks in the same order, or None
        # what a compiled graph calls this group by
        what = (tuple(ranks or ()), rank, size, telemetry is not None, group is None, comm is not None)
        self.number = _NUMBERS.setdefault(what, len(_NUMBERS))
        _GROUPS[self.number] = self

    @property
    def transport(self) -> str:
        if self.comm is not None:
            return "mpi"
        import torch.distributed as dist

        return dist.get_backend(self.group) if dist.is_initialized() else "none"

    def uncounted(self) -> Group:
        """The same group, its collectives counted by the caller instead."""
        return Group(self.group, rank=self.rank, size=self.size, ranks=self.ranks, comm=self.comm)

    def _timed(self, kind: str):
        return self.telemetry.timed_collective(kind) if self.telemetry is not None else contextlib.nullcontext()

    def all_reduce(self, tensor):
        """The sum of ``tensor`` over the group (in place when it is contiguous)."""
        if torch.compiler.is_compiling():
            return torch.ops.mpbook.all_reduce(tensor, self.number)
        return self.eager_all_reduce(tensor)

    def eager_all_reduce(self, tensor):
        import torch.distributed as dist

        tensor = tensor.contiguous()  # gloo and MPI need dense memory; a no-op when it already is
        with self._timed("all_reduce"):
            if self.comm is not None:
                return self.comm.all_reduce(tensor)
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, local, sizes: list[int]):
        """Every rank's ``local`` concatenated along the last dim; rank r holds ``sizes[r]``
        columns. Uneven shards (a vocabulary of 259 over 2 ranks: 130 + 129) are padded to the
        largest, gathered and trimmed, since all_gather wants equal shapes."""
        if torch.compiler.is_compiling():
            return torch.ops.mpbook.all_gather_last_dim(local, self.number, list(sizes))
        return self.eager_all_gather_last_dim(local, sizes)

    def eager_all_gather_last_dim(self, local, sizes: list[int]):
        import torch.distributed as dist

        width = max(sizes)
        padded = local.contiguous()
        if local.shape[-1] < width:
            padded = torch.nn.functional.pad(padded, (0, width - local.shape[-1]))
        with self._timed("all_gather"):
            parts = self._all_gather(padded)
        return torch.cat([part[..., :n] for part, n in zip(parts, sizes)], dim=-1)

    @not_traced
    def gather_last_dim(self, local, sizes: list[int]):
        """Every rank's ``local`` concatenated along the last dim on the group's first rank
        (None on the others); uneven shards padded and trimmed as in :meth:`all_gather_last_dim`."""
        import torch
        import torch.distributed as dist

        width = max(sizes)
        padded = local.contiguous()
        if local.shape[-1] < width:
            padded = torch.nn.functional.pad(padded, (0, width - local.shape[-1]))
        first = self.rank == 0
        if self.comm is not None:
            with self._timed("gather"):
                parts = self.comm.gather(padded, root=0)
            return None if parts is None else torch.cat([part[..., :n] for part, n in zip(parts, sizes)], dim=-1)
        parts = [torch.empty_like(padded) for _ in range(self.size)] if first else None
        if self.ranks is not None:
            dst = self.ranks[0]
        else:  # the default group's first rank is rank 0
            dst = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with self._timed("gather"):
            dist.gather(padded, parts, dst=dst, group=self.group)
        if not first:
            return None
        return torch.cat([part[..., :n] for part, n in zip(parts, sizes)], dim=-1)

    @not_traced
    def all_gather_stack(self, local):
        """Every rank's equal-shaped ``local``, stacked on a new leading dim (in rank order)."""
        import torch
        import torch.distributed as dist

        with self._timed("all_gather"):
            parts = self._all_gather(local.contiguous())
        return parts if self.comm is not None else torch.stack(parts)

    @not_traced
    def broadcast(self, tensor, *, src: int = 0):
        """Group rank ``src``'s ``tensor`` on every rank of the group, in place."""
        import torch.distributed as dist

        with self._timed("broadcast"):
            if self.comm is not None:
                return self.comm.broadcast(tensor, root=src)
            global_src = self.ranks[src] if self.ranks is not None else dist.get_global_rank(self.group, src)
            dist.broadcast(tensor, src=global_src, group=self.group)
        return tensor

    def _all_gather(self, local):
        """Every rank's ``local``, in rank order: one (size, ...) tensor under MPI, a list otherwise."""
        import torch
        import torch.distributed as dist

        if self.comm is not None:
            return self.comm.all_gather(local)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return parts

    def __repr__(self) -> str:
        return f"Group(rank {self.rank} of {self.size}, {'mpi' if self.comm is not None else 'process group'})"
