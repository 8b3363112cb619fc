"""Topology: a (dp, pp, ep, tp) layout of ranks, and the mesh each engine builds from it.

The layout is a tensor, ``arange(world).view(dp, pp, ep, tp)``: a rank's coordinates are
where its number sits, and the ranks of one group are a line along one axis. tp is
innermost so that a tensor-parallel group (a collective in every layer) is made of
neighbouring ranks, which on one host are neighbouring GPUs; ep next, since an expert group
holds the same tokens (attention replicated over it) and meets once per MoE layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the client imports this module without paying for torch
    import torch

DIMS = ("dp", "pp", "ep", "tp")
# The strategies mpbook runs, and the degree each one owns: the one that takes the engines
# the other degrees leave (``tensor --pp 2`` on 4 engines is tp=2 x pp=2).
STRATEGIES = ("data", "pipeline", "tensor", "expert")
OWN_DIM = {"data": "dp", "pipeline": "pp", "tensor": "tp", "expert": "ep"}


class Coords(NamedTuple):
    dp: int
    pp: int
    ep: int
    tp: int


@dataclass(frozen=True)
class Layout:
    """Degrees of data, pipeline, expert and tensor parallelism; their product is the world size."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: every degree must be a whole number >= 1")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.ep * self.tp

    @property
    def strategy(self) -> str:
        """The strategy a run of this layout names (its other degrees go as dp=, tp= ...):
        the pipeline when there are stages, else experts, tensor, data."""
        for strategy in ("pipeline", "expert", "tensor", "data"):
            if getattr(self, OWN_DIM[strategy]) > 1:
                return strategy
        return "data"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.dp, self.pp, self.ep, self.tp)

    def grid(self) -> torch.Tensor:
        import torch

        return torch.arange(self.world_size).view(self.shape)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return Coords(*(self.grid() == rank).nonzero()[0].tolist())

    def group_ranks(self, dims: str | tuple[str, ...], rank: int) -> list[int]:
        """The ranks that share every coordinate with ``rank`` except along ``dims``."""
        return next(group for group in self.groups(dims) if rank in group)

    def groups(self, dims: str | tuple[str, ...]) -> list[list[int]]:
        """Every group along ``dims`` ("tp", or ("ep", "tp") for both), in a fixed order."""
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        grid = self.grid()
        inner = [DIMS.index(d) for d in DIMS if d in dims]
        outer = [i for i in range(len(DIMS)) if i not in inner]
        lines = grid.permute(*outer, *inner).reshape(-1, _size(self, inner))
        return [line.tolist() for line in lines]

    def __str__(self) -> str:
        text = f"dp={self.dp} x pp={self.pp} x tp={self.tp}"
        return text + (f" x ep={self.ep}" if self.ep > 1 else "")


def _size(layout: Layout, axes: list[int]) -> int:
    return math.prod(layout.shape[axis] for axis in axes)


class Mesh:
    """One rank's view of a layout: its coordinates, and its process groups made on demand.

    Making a group is a collective step every rank takes together (``dist.new_group`` for
    every group along the same dims, in the same order), so groups are made on first use of
    a set of dims, on every rank at the same point of the run, and kept.

    ``world``: when the engines share an MPI world, its communicator over all ranks
    (:mod:`mpbook.parallel.mpi`); :meth:`comm` splits it along dims as :meth:`group` does.
    """

    def __init__(self, layout: Layout, rank: int, device_type: str, world=None):
        self.layout = layout
        self.rank = rank
        self.device_type = device_type
        self.world = world
        self.coords = layout.coords(rank)
        self._groups: dict[tuple[str, ...], object] = {}
        self._comms: dict[tuple[str, ...], object] = {}
        self._device_mesh = None

    def _key(self, dims) -> tuple[str, ...]:
        # Dims of degree 1 add no rank, so ("ep", "tp") with ep=1 is ("tp",).
        return tuple(d for d in DIMS if d in dims and getattr(self.layout, d) > 1) or tuple(d for d in DIMS if d in dims)

    def comm(self, *dims: str):
        """This rank's MPI communicator along ``dims``, ranked as :meth:`ranks` lists them;
        None without an MPI world. Collective, like :meth:`group`."""
        if self.world is None:
            return None
        key = self._key(dims)
        if key not in self._comms:
            groups = self.layout.groups(key)
            color = next(i for i, ranks in enumerate(groups) if self.rank in ranks)
            self._comms[key] = self.world.split(color, groups[color].index(self.rank))
        return self._comms[key]

    def group(self, *dims: str):
        """This rank's process group along ``dims`` (e.g. ``group("tp")``, ``group("ep", "tp")``).

        Dims of degree 1 add no rank, so ``group("ep", "tp")`` with ep=1 is ``group("tp")``."""
        key = self._key(dims)
        if key not in self._groups:
            import torch.distributed as dist

            mine = None
            for ranks in self.layout.groups(key):
                made = dist.new_group(ranks)  # every rank makes every group, in order
                if self.rank in ranks:
                    mine = made
            self._groups[key] = mine
        return self._groups[key]

    def ranks(self, *dims: str) -> list[int]:
        return self.layout.group_ranks(tuple(dims), self.rank)

    @property
    def device_mesh(self):
        """torch's DeviceMesh over the whole layout (for DTensor code in a ``%%mp run`` cell)."""
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(self.device_type, self.layout.shape, mesh_dim_names=DIMS)
        return self._device_mesh

    def __getitem__(self, dim: str):
        """The one-dimensional DeviceMesh along ``dim`` ("dp", "pp", "ep" or "tp") holding this rank."""
        return self.device_mesh[dim]

    def __repr__(self) -> str:
        c = self.coords
        return f"Mesh({self.layout}, rank={self.rank}: dp={c.dp} pp={c.pp} ep={c.ep} tp={c.tp})"


def ranks_by_host(hosts) -> list[tuple[str, list[int]]]:
    """(host, ranks) in rank order, one entry per run of ranks on one host (``hosts`` by rank).
    Ranks are grouped by host (:func:`mpbook.cluster.hosts.rank_order`), so each host is one run."""
    groups: list[tuple[str, list[int]]] = []
    for rank, host in enumerate(hosts):
        if groups and groups[-1][0] == host:
            groups[-1][1].append(rank)
        else:
            groups.append((host, [rank]))
    return groups
