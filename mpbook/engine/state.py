"""What lives on each engine: its rank, device, process group and mesh.

The functions here and in the engine's other modules run inside engine processes (sent by
the client through ipyparallel's ``apply``). An engine keeps one :class:`EngineState` in its
user namespace, so it survives between cells; :func:`mpbook.engine.group.call` hands it to
the function the client sent. Joining and leaving the group is :mod:`.group`, the meeting
point of its ranks :mod:`.rendezvous`, the IPython hooks :mod:`.hooks`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..devices import usable_cores
from ..layout import Layout, Mesh
from ..protocol import EngineInfo, Rendezvous
from .network import hostname

STATE_NAME = "_mpbook"


@dataclass
class EngineState:
    rank: int
    world_size: int
    local_rank: int
    engine_id: int
    device: Any  # torch.device
    backend: str
    timeout_s: float
    rendezvous: Rendezvous | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # models and other per-engine state kept between cells
    peer_pids: list[int] = field(default_factory=list)  # the other engines of the group on this host
    peer_addresses: list[str] = field(default_factory=list)  # those of the group's engines on other hosts
    telemetry: Any = None  # mpbook.engine.telemetry.Telemetry
    publisher: Any = None  # mpbook.engine.publish.Publisher: sends telemetry to the client while a task runs
    # When the engines share an MPI world: a communicator over every rank, split afresh each
    # time the group is formed (mpbook.parallel.mpi); mpbook's own collectives go through it.
    mpi: Any = None

    @property
    def transport(self) -> str:
        """What mpbook's collectives between this engine and the others travel over."""
        return "mpi" if self.mpi is not None else self.backend

    @property
    def mesh(self) -> Mesh:
        """The mesh of every rank as one data-parallel dim (a ``%%mp run`` cell's ``mesh``),
        kept with the meshes of the other layouts (:func:`engine_mesh`)."""
        return engine_mesh(self, Layout(dp=self.world_size))


def engine_mesh(state: EngineState, layout: Layout) -> Mesh:
    """This engine's mesh of ``layout``, made once and kept: its groups are made once (a
    collective step) and reused when a later run comes back to the same layout."""
    meshes = state.cache.setdefault("meshes", {})
    if layout not in meshes:
        meshes[layout] = Mesh(layout, state.rank, state.device.type, world=state.mpi)
    return meshes[layout]


def user_namespace() -> dict:
    """The engine's IPython user namespace, where its state is kept between cells."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("mpbook engine functions run inside an ipyparallel engine")
    return shell.user_ns


def engine_id() -> int:
    """This engine's id in its ipyparallel cluster."""
    from ipykernel.kernelbase import Kernel

    return int(Kernel.instance().engine_id)


def current() -> EngineState | None:
    """This engine's state, None when it has none (never set up, or left its group)."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell.user_ns.get(STATE_NAME) if shell is not None else None


def state() -> EngineState:
    """This engine's state; a clear error when the engine was never set up (or restarted)."""
    found = user_namespace().get(STATE_NAME)
    if found is None:
        raise RuntimeError(
            f"engine {engine_id()} has no process group: it was started or restarted outside mpbook; "
            "run `%mp restart` (or Workbench.restart())"
        )
    return found


def telemetry_snapshot() -> dict[str, Any]:
    """This engine's telemetry snapshot, returned rather than published (a standing dashboard's poll)."""
    return state().telemetry.snapshot()


def describe(state: EngineState) -> EngineInfo:
    import psutil
    import torch

    if state.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(state.device)
        name = torch.cuda.get_device_name(state.device)
    else:
        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
        name = "cpu"
    return EngineInfo(
        rank=state.rank,
        engine_id=state.engine_id,
        host=hostname(),
        pid=os.getpid(),
        device=str(state.device),
        device_name=name,
        backend=state.backend,
        memory_free_bytes=int(free),
        memory_total_bytes=int(total),
        threads=torch.get_num_threads(),
        model_bytes=getattr(state.cache.get("runner"), "weight_bytes", 0),
        transport=state.transport,
        cores=usable_cores(),
    )
