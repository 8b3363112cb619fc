"""Where an engine's ranks meet to form their process group, and the group's own sockets.

Rank 0 makes the meeting point (a file store in a private folder on one host, a TCP store
on the hosts' shared address across hosts); every rank then joins the group there, leaving
its host, pid and address for the others (an interrupted rank ends its connections to them:
:mod:`.disconnect`).
"""

from __future__ import annotations

import os

from ..protocol import Rendezvous
from .network import group_address, hostname
from .state import current, user_namespace

TCP_STORE = "_mpbook_tcp_store"  # rank 0's TCP store, kept in its namespace while the group lives
ENDED_FOLDERS = "_mpbook_ended_rendezvous"  # rank 0's folders of groups that ended, still to remove


def make_rendezvous(kind: str, toward: str | None = None) -> Rendezvous:
    """Run on rank 0: make the meeting point that the other ranks will join.

    ``toward``: the address the hosts share; the TCP store then listens on this host's
    address on the route to it, and on no other interface."""
    import tempfile

    # The client forms a group only once every rank has left the one before: no rank's
    # file store can still be using the folders of groups that ended.
    remove_ended_folders()
    if kind == "file":
        # mkdtemp makes the folder readable by this user only.
        path = os.path.join(tempfile.mkdtemp(prefix="mpbook-rdzv-"), "store")
        return Rendezvous("file", path=path)
    if kind == "tcp":
        from datetime import timedelta

        import torch.distributed as dist

        host = group_address(toward)
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
        user_namespace()[TCP_STORE] = store
        return Rendezvous("tcp", host=host, port=store.port)
    raise ValueError(f"unknown rendezvous kind {kind!r}; use 'file' or 'tcp'")


def keep_to_interface(rendezvous: Rendezvous, toward: str | None) -> None:
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


def join_group(rendezvous: Rendezvous, *, rank: int, world_size: int, timeout_s: float, backend: str,
               device, toward: str | None) -> list[list[str]]:
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
        store = user_namespace().get(TCP_STORE) if rank == 0 else None
        if store is None:
            store = dist.TCPStore(
                rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s)
            )
    # Each rank leaves its host, pid and address in the store (an interrupted rank ends its
    # connections to the other engines, see group.abort_group).
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


def forget_store() -> None:
    """Drop rank 0's TCP store (the group it served has ended)."""
    user_namespace().pop(TCP_STORE, None)


def set_folder_aside(rank: int, rendezvous: Rendezvous | None) -> None:
    """Rank 0 of a file rendezvous made a private folder for it: remove it once every rank
    has left the group (the next group's rendezvous, or the engine's way out), not as rank 0
    leaves. Another rank may still be destroying its FileStore then: torch's store looks for
    its file, then opens it again, and a file gone in between is waited for until the store
    times out, when the store's destructor throws and the engine aborts. That rank would
    leave the group a whole timeout late, and then die."""
    if rank == 0 and rendezvous is not None and rendezvous.kind == "file":
        user_namespace().setdefault(ENDED_FOLDERS, []).append(os.path.dirname(rendezvous.path))


def remove_ended_folders() -> None:
    """Remove the folders of the groups this engine was rank 0 of, which have ended."""
    import shutil

    for folder in user_namespace().pop(ENDED_FOLDERS, []):
        shutil.rmtree(folder, ignore_errors=True)


def remove_rendezvous() -> None:
    """On an engine's way out (however the cluster ended): remove the rendezvous folder it made.

    Only rank 0 of a file rendezvous made one. Its group has ended (``group.teardown`` set
    it aside) or ends now, with the engine (stopped from outside: its notebook kernel killed,
    for example).
    """
    state = current()
    if state is not None:
        set_folder_aside(state.rank, state.rendezvous)
    remove_ended_folders()
