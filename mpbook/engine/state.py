"""What lives on each engine: its rank, device, process group and mesh.

The functions here run inside engine processes (sent by the client through ipyparallel's
``apply``). An engine keeps one :class:`EngineState` in its user namespace, so it survives
between cells; :func:`call` hands it to the function the client sent.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..errors import collective_failed
from ..layout import Layout, Mesh
from ..protocol import EngineInfo, Rendezvous
from .disconnect import close_connections_to, close_connections_to_hosts
from .telemetry import Telemetry

STATE_NAME = "_mpbook"
KEPT_RUNNER = "_mpbook_kept_runner"  # a model kept across a rebuild of the group (teardown)


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


def _namespace() -> dict:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("mpbook engine functions run inside an ipyparallel engine")
    return shell.user_ns


def engine_id() -> int:
    """This engine's id in its ipyparallel cluster."""
    from ipykernel.kernelbase import Kernel

    return int(Kernel.instance().engine_id)


def state() -> EngineState:
    """This engine's state; a clear error when the engine was never set up (or restarted)."""
    found = _namespace().get(STATE_NAME)
    if found is None:
        raise RuntimeError(
            f"engine {engine_id()} has no process group: it was started or restarted outside mpbook; "
            "run `%mp restart` (or Workbench.restart())"
        )
    return found


def call(fn, /, *args, **kwargs):
    """Run ``fn(state, *args, **kwargs)`` on this engine (the client sends this via apply).

    An interrupt leaves this rank's part of any collective unfinished: the group is aborted
    at once, so that a peer waiting in a collective with this rank fails now rather than
    after the timeout; the client then forms the group again. So does a collective that
    failed here because a peer left: the ranks waiting for *this* one (a pipeline's other
    stages) would otherwise wait out the timeout.
    """
    found = state()
    with found.publisher.task():
        try:
            return fn(found, *args, **kwargs)
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            if collective_failed(type(exc).__name__, str(exc)):
                abort_group(found)
            raise
        # Outside the except block the traceback is gone, and with it the frames that hold
        # the run's pending sends: a live gloo Work keeps its connection open, so the peer
        # would not notice this rank leave.
        abort_group(found)
        raise KeyboardInterrupt


def telemetry_snapshot() -> dict[str, Any]:
    """This engine's telemetry snapshot, returned rather than published (a standing dashboard's poll)."""
    return state().telemetry.snapshot()


def hostname() -> str:
    return socket.gethostname()


def host_address() -> str:
    """An address of this host that other hosts can reach (for a TCP rendezvous)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def group_address(toward: str | None) -> str:
    """The address this engine's process group uses: on the route to ``toward`` (the address
    the hosts share) when given, else the one its host name resolves to."""
    from .network import route_source

    return route_source(toward) if toward else host_address()


def make_rendezvous(kind: str, toward: str | None = None) -> Rendezvous:
    """Run on rank 0: make the meeting point that the other ranks will join.

    ``toward``: the address the hosts share; the TCP store then listens on this host's
    address on the route to it, and on no other interface."""
    import tempfile

    if kind == "file":
        # mkdtemp makes the folder readable by this user only.
        path = os.path.join(tempfile.mkdtemp(prefix="mpbook-rdzv-"), "store")
        return Rendezvous("file", path=path)
    if kind == "tcp":
        from datetime import timedelta

        import torch.distributed as dist

        host = group_address(toward)
        ns = _namespace()
        if toward:
            from .network import listening_socket

            # torch's store would listen on every interface; handed a listening socket, it
            # serves there (and closes the descriptor it was given when it ends).
            with listening_socket(host) as sock:
                store = dist.TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                                      timeout=timedelta(seconds=60), master_listen_fd=os.dup(sock.fileno()))
        else:
            # port 0: the OS picks a free port; the store reports which.
            store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        ns["_mpbook_tcp_store"] = store
        return Rendezvous("tcp", host=host, port=store.port)
    raise ValueError(f"unknown rendezvous kind {kind!r}; use 'file' or 'tcp'")


def setup_from_table(table: dict[int, dict]) -> EngineInfo:
    """Set up this engine with its own row of ``table`` (engine id -> arguments of setup)."""
    return setup(**table[engine_id()])


def setup(
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    engine_id: int,
    use_gpu: bool,
    threads: int | None,
    rendezvous: Rendezvous,
    timeout_s: float,
    mpi: bool = False,
    toward: str | None = None,
) -> EngineInfo:
    """Pin this engine to its device, join the process group and bind the cell names.

    ``mpi``: the engines share an MPI world (started by mpiexec): mpbook's collectives use a
    fresh communicator split from it (every engine of the world takes part).
    ``toward``: engines on several hosts: the address they share; gloo and NCCL keep to the
    interface of this host's route to it."""
    from . import publish

    ns = _namespace()
    previous = ns.get(STATE_NAME)
    if previous is not None:  # set up again on the same engine (a restart of an attached cluster)
        publish.uninstall(previous.publisher)
    device, backend = _pin_device(use_gpu=use_gpu, local_rank=local_rank, threads=threads)
    _keep_to_interface(rendezvous, toward)
    peers = _join_group(rendezvous, rank=rank, world_size=world_size, timeout_s=timeout_s, backend=backend,
                        device=device if use_gpu else None, toward=toward, ns=ns)
    comm = None
    if mpi:
        from ..parallel import mpi as mpi_transport

        comm = mpi_transport.world(rank, timeout_s=timeout_s)

    state = EngineState(
        rank=rank, world_size=world_size, local_rank=local_rank, engine_id=engine_id, device=device,
        backend=backend, timeout_s=timeout_s, rendezvous=rendezvous, telemetry=Telemetry(rank, device),
        peer_pids=[int(pid) for host, pid, _ in peers if host == hostname()],
        peer_addresses=sorted({address for host, _, address in peers if host != hostname()}),
        mpi=comm,
    )
    kept = ns.pop(KEPT_RUNNER, None)
    if kept is not None and kept[:2] == (rank, world_size):
        state.cache["runner"], state.telemetry = kept[2], kept[3]
    state.publisher = publish.install(state)
    _abort_after_interrupted_cells(state)
    _plain_tracebacks()
    ns[STATE_NAME] = state
    _bind_cell_names(ns, state)
    return describe(state)


def _pin_device(*, use_gpu: bool, local_rank: int, threads: int | None):
    """This engine's device and the process group's backend: the GPU of its local rank
    (NCCL), or the CPU (gloo) with ``threads`` intra-op threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device, "nccl"
    return torch.device("cpu"), "gloo"


def _keep_to_interface(rendezvous: Rendezvous, toward: str | None) -> None:
    """The one interface gloo and NCCL may use."""
    if rendezvous.kind == "file":
        # Ranks on one host talk over loopback only; nothing is reachable from outside.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    elif toward:
        from .network import interface_of

        # Only the interface the hosts share, not whatever the host name resolves to.
        interface = interface_of(group_address(toward))
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ["NCCL_SOCKET_IFNAME"] = interface


def _join_group(rendezvous: Rendezvous, *, rank: int, world_size: int, timeout_s: float, backend: str,
                device, toward: str | None, ns: dict) -> list[list[str]]:
    """Form the process group (a group left from before is destroyed first); returns the
    other ranks' (host, pid, address) as they left them in the store. ``device``: the GPU
    the group is bound to, None on a CPU."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if rendezvous.kind == "file":
        store = dist.FileStore(rendezvous.path, world_size)
    else:
        store = ns.get("_mpbook_tcp_store") if rank == 0 else None
        if store is None:
            store = dist.TCPStore(
                rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s)
            )
    # Each rank leaves its host, pid and address in the store (an interrupted rank ends its
    # connections to the other engines, see abort_group).
    address = group_address(toward) if rendezvous.kind == "tcp" else "127.0.0.1"
    store.set(f"mpbook/pid/{rank}", f"{hostname()} {os.getpid()} {address}")
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device,
    )
    return [store.get(f"mpbook/pid/{other}").decode().split() for other in range(world_size) if other != rank]


def _bind_cell_names(ns: dict, state: EngineState) -> None:
    """The names a `%%mp run` cell can use directly."""
    import torch
    import torch.distributed as dist

    comm = state.mpi
    ns.update(
        rank=state.rank, world_size=state.world_size, device=state.device, mesh=state.mesh,
        telemetry=state.telemetry, torch=torch, dist=dist,
        comm=comm.comm if comm is not None else None,  # the mpi4py communicator, ranked as mpbook ranks
    )


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
    )


def _plain_tracebacks() -> None:
    """Report this engine's errors with Python's own traceback format (``%xmode Plain``).

    IPython's default mode parses every source file in the stack (torch's and the model's)
    to show context around each frame: 1-3 s on a busy CPU before the error reaches the
    client, which holds up every interrupt and failure of a run (its ranks all report one).
    Plain mode keeps each frame's file, line and code, and takes milliseconds."""
    from IPython import get_ipython

    get_ipython().InteractiveTB.set_mode("Plain")


def _abort_after_interrupted_cells(state: EngineState) -> None:
    """A ``%%mp run`` cell interrupted on this rank may have left a collective unfinished:
    abort the group as an interrupted apply does (the client forms it again)."""
    from IPython import get_ipython

    def after(result) -> None:
        if isinstance(result.error_in_exec, KeyboardInterrupt) and _namespace().get(STATE_NAME) is state:
            abort_group(state)

    def before(info) -> None:
        # A cell's own tokens are this rank's alone, whatever replica the last strategy run
        # made it part of (the dashboard counts each replica's tokens once).
        state.telemetry.replica = state.rank

    get_ipython().events.register("post_run_cell", after)
    get_ipython().events.register("pre_run_cell", before)


def abort_group(state: EngineState | None = None) -> None:
    """Drop this rank's process groups now (after an interrupt): peers blocked in a
    collective with this rank see the connection close and fail at once."""
    from ..compat import torch as torch_compat

    import gc

    state = state or _namespace().get(STATE_NAME)
    if state is not None and state.mpi is not None:
        # Peers waiting for this rank in shared memory see no connection close: tell them.
        state.mpi.leave()
    if state is not None:
        state.cache.pop("meshes", None)  # they hold subgroups of the group being dropped
        runner = state.cache.get("runner")
        if runner is not None:
            # The model stays: its collectives are pointed at the new groups when the client
            # has formed them again (teardown(keep_model=True), then Runner.rebind).
            runner.detach()
    # What still refers to the groups' work through reference cycles: the interrupted run's
    # frames and handles, all young. A full collection would also walk torch's, transformers'
    # and the model's objects (a third of a second an engine, twice per interrupt).
    gc.collect(1)
    torch_compat.abort_process_groups()
    if state is not None:
        # Destroying a gloo group does not close its connections while anything in the
        # process still refers to its context (seen with work handles of a run in flight):
        # shut the connections to the other engines down, so a peer blocked in a
        # collective with this rank fails now instead of after the timeout.
        close_connections_to(state.peer_pids)
        if state.peer_addresses:
            close_connections_to_hosts(state.peer_addresses, state.rendezvous)


def teardown(state: EngineState | None = None, *, keep_model: bool = False) -> None:
    """Leave the process group and forget models, so a restart starts clean.

    ``keep_model``: the group is about to be formed again on the same engines (after a failed
    collective or an interrupt): the loaded model stays for the next run, its collectives
    pointed at the new groups then (Runner.rebind)."""
    import gc
    import shutil

    import torch.distributed as dist

    from . import publish

    ns = _namespace()
    if state is None:
        state = ns.get(STATE_NAME)
    if state is not None:
        publish.uninstall(state.publisher)
        runner = state.cache.get("runner")
        if keep_model and runner is not None:
            # Its collectives let go of the old groups (a group referred to keeps its sockets
            # open after it is destroyed) and take the new ones at the next run (rebind); its
            # hooks report into this telemetry, which the next state keeps too.
            runner.detach()
            ns[KEPT_RUNNER] = (state.rank, state.world_size, runner, state.telemetry)
        state.cache.clear()
    # Models and meshes dropped above may sit in reference cycles. When the group is formed
    # again at once (an interrupt, a failed collective) the model stays and only the young
    # objects of the run that ended need collecting; a stop or restart collects everything.
    gc.collect(1 if keep_model else 2)
    if dist.is_initialized():
        dist.destroy_process_group()
    ns.pop("_mpbook_tcp_store", None)
    if state is not None:
        rdzv = state.rendezvous
        if state.rank == 0 and rdzv is not None and rdzv.kind == "file":
            shutil.rmtree(os.path.dirname(rdzv.path), ignore_errors=True)
    ns.pop(STATE_NAME, None)


def remove_rendezvous() -> None:
    """On an engine's way out (however the cluster ended): remove the rendezvous folder it made.

    Only rank 0 of a file rendezvous made one; ``teardown`` removes it on a clean stop, this
    covers an engine stopped from outside (its notebook kernel killed, for example).
    """
    import shutil

    from IPython import get_ipython

    shell = get_ipython()
    state = shell.user_ns.get(STATE_NAME) if shell is not None else None
    rdzv = state.rendezvous if state is not None else None
    if state is not None and state.rank == 0 and rdzv is not None and rdzv.kind == "file":
        shutil.rmtree(os.path.dirname(rdzv.path), ignore_errors=True)
