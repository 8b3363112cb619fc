"""An engine's membership of the process group: joining it (``setup``), running the client's
tasks in it (``call``), dropping it at once after an interrupt (``abort_group``) and leaving
it (``teardown``)."""

from __future__ import annotations

from ..errors import collective_failed
from ..protocol import EngineInfo, Rendezvous
from . import hooks, rendezvous as meeting
from .disconnect import close_connections_to, close_connections_to_hosts
from .network import hostname
from .state import STATE_NAME, EngineState, current, describe, engine_id, state, user_namespace
from .telemetry import Telemetry

KEPT_RUNNER = "_mpbook_kept_runner"  # a model kept across a rebuild of the group (teardown)


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

    ns = user_namespace()
    previous = ns.get(STATE_NAME)
    if previous is not None:  # set up again on the same engine (a restart of an attached cluster)
        publish.uninstall(previous.publisher)
    device, backend = pin_device(use_gpu=use_gpu, local_rank=local_rank, threads=threads)
    meeting.keep_to_interface(rendezvous, toward)
    peers = meeting.join_group(rendezvous, rank=rank, world_size=world_size, timeout_s=timeout_s,
                               backend=backend, device=device if use_gpu else None, toward=toward)
    comm = None
    if mpi:
        from ..parallel import mpi as mpi_transport

        comm = mpi_transport.world(rank, timeout_s=timeout_s)

    joined = EngineState(
        rank=rank, world_size=world_size, local_rank=local_rank, engine_id=engine_id, device=device,
        backend=backend, timeout_s=timeout_s, rendezvous=rendezvous, telemetry=Telemetry(rank, device),
        peer_pids=[int(pid) for host, pid, _ in peers if host == hostname()],
        peer_addresses=sorted({address for host, _, address in peers if host != hostname()}),
        mpi=comm,
    )
    kept = ns.pop(KEPT_RUNNER, None)
    if kept is not None and kept[:2] == (rank, world_size):
        joined.cache["runner"], joined.telemetry = kept[2], kept[3]
    joined.publisher = publish.install(joined)
    hooks.after_interrupted_cells(joined, abort_group)
    hooks.plain_tracebacks()
    ns[STATE_NAME] = joined
    bind_cell_names(ns, joined)
    return describe(joined)


def pin_device(*, use_gpu: bool, local_rank: int, threads: int | None):
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


def bind_cell_names(ns: dict, joined: EngineState) -> None:
    """The names a `%%mp run` cell can use directly."""
    import torch
    import torch.distributed as dist

    comm = joined.mpi
    ns.update(
        rank=joined.rank, world_size=joined.world_size, device=joined.device, mesh=joined.mesh,
        telemetry=joined.telemetry, torch=torch, dist=dist,
        comm=comm.comm if comm is not None else None,  # the mpi4py communicator, ranked as mpbook ranks
    )


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


def abort_group(found: EngineState | None = None) -> None:
    """Drop this rank's process groups now (after an interrupt): peers blocked in a
    collective with this rank see the connection close and fail at once."""
    import gc

    from ..compat import torch as torch_compat

    found = found or current()
    if found is not None and found.mpi is not None:
        # Peers waiting for this rank in shared memory see no connection close: tell them.
        found.mpi.leave()
    if found is not None:
        found.cache.pop("meshes", None)  # they hold subgroups of the group being dropped
        runner = found.cache.get("runner")
        if runner is not None:
            # The model stays: its collectives are pointed at the new groups when the client
            # has formed them again (teardown(keep_model=True), then Runner.rebind).
            runner.detach()
    # What still refers to the groups' work through reference cycles: the interrupted run's
    # frames and handles, all young. A full collection would also walk torch's, transformers'
    # and the model's objects (a third of a second an engine, twice per interrupt).
    gc.collect(1)
    torch_compat.abort_process_groups()
    if found is not None:
        # Destroying a gloo group does not close its connections while anything in the
        # process still refers to its context (seen with work handles of a run in flight):
        # shut the connections to the other engines down, so a peer blocked in a
        # collective with this rank fails now instead of after the timeout.
        close_connections_to(found.peer_pids)
        if found.peer_addresses:
            close_connections_to_hosts(found.peer_addresses, found.rendezvous)


def teardown(found: EngineState | None = None, *, keep_model: bool = False) -> None:
    """Leave the process group and forget models, so a restart starts clean.

    ``keep_model``: the group is about to be formed again on the same engines (after a failed
    collective or an interrupt): the loaded model stays for the next run, its collectives
    pointed at the new groups then (Runner.rebind)."""
    import gc

    import torch.distributed as dist

    from . import publish

    ns = user_namespace()
    if found is None:
        found = ns.get(STATE_NAME)
    if found is not None:
        publish.uninstall(found.publisher)
        runner = found.cache.get("runner")
        if keep_model and runner is not None:
            # Its collectives let go of the old groups (a group referred to keeps its sockets
            # open after it is destroyed) and take the new ones at the next run (rebind); its
            # hooks report into this telemetry, which the next state keeps too.
            runner.detach()
            ns[KEPT_RUNNER] = (found.rank, found.world_size, runner, found.telemetry)
        found.cache.clear()
    # Models and meshes dropped above may sit in reference cycles. When the group is formed
    # again at once (an interrupt, a failed collective) the model stays and only the young
    # objects of the run that ended need collecting; a stop or restart collects everything.
    gc.collect(1 if keep_model else 2)
    if dist.is_initialized():
        dist.destroy_process_group()
    meeting.forget_store()
    if found is not None:
        meeting.set_folder_aside(found.rank, found.rendezvous)
    ns.pop(STATE_NAME, None)
