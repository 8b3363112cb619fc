"""Topology: a (dp, pp, tp) layout of ranks, and the mesh each engine builds from it.

The layout is a tensor, ``arange(world).view(dp, pp, tp)``: a rank's coordinates are where
its number sits, and the ranks of one tensor-parallel group are a row of the last axis.
tp is innermost so that a tensor-parallel group (a collective in every layer) is made of
neighbouring ranks, which on one host are neighbouring GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the client imports this module without paying for torch
    import torch
    from torch.distributed.device_mesh import DeviceMesh

DIMS = ("dp", "pp", "tp")


class Coords(NamedTuple):
    dp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class Layout:
    """Degrees of data, pipeline and tensor parallelism; their product is the world size."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: every degree must be a whole number >= 1")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    def grid(self) -> torch.Tensor:
        import torch

        return torch.arange(self.world_size).view(self.shape)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return Coords(*(self.grid() == rank).nonzero()[0].tolist())

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """The ranks that share every coordinate with ``rank`` except along ``dim``."""
        c = self.coords(rank)
        grid = self.grid()
        index = [c.dp, c.pp, c.tp]
        index[DIMS.index(dim)] = slice(None)
        return grid[tuple(index)].tolist()

    def __str__(self) -> str:
        return f"dp={self.dp} x pp={self.pp} x tp={self.tp}"


class Mesh:
    """One rank's view of a layout: its coordinates, and torch's DeviceMesh built on demand.

    Building the DeviceMesh creates process subgroups, a collective step that every rank
    must take together, so it happens on first use rather than at start-up.
    """

    def __init__(self, layout: Layout, rank: int, device_type: str):
        self.layout = layout
        self.rank = rank
        self.device_type = device_type
        self.coords = layout.coords(rank)

    @cached_property
    def device_mesh(self) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, self.layout.shape, mesh_dim_names=DIMS)

    def __getitem__(self, dim: str) -> DeviceMesh:
        """The one-dimensional sub-mesh along ``dim`` ("dp", "pp" or "tp") holding this rank."""
        return self.device_mesh[dim]

    def __repr__(self) -> str:
        c = self.coords
        return f"Mesh({self.layout}, rank={self.rank}: dp={c.dp} pp={c.pp} tp={c.tp})"
