"""Ending this process's TCP streams to the other engines of its group, after an interrupt.

Destroying a gloo group does not close its connections while anything in the process still
refers to its context (seen with work handles of a run in flight): a peer blocked in a
collective with this rank would wait out the timeout. Shutting the streams down (the sockets
stay open until their owner closes them) makes the peer fail at once.
"""

from __future__ import annotations

import os
import socket

from ..protocol import Rendezvous


def close_connections_to(pids) -> int:
    """Shut down this process's TCP connections to the processes ``pids`` (engines on this
    host); returns how many. The sockets stay open until their owner closes them; only the
    stream is ended, which the peer sees at once."""
    import psutil

    ports = set()
    for pid in pids:
        try:
            ports.update(c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.laddr)
        except psutil.Error:
            continue
    closed = 0
    for conn in psutil.Process().net_connections("tcp"):
        if conn.raddr and conn.raddr in ports and conn.fd >= 0:
            closed += _shut_down(conn.fd)
    return closed


def _shut_down(fd: int) -> int:
    """End the TCP stream on ``fd`` (a duplicate is shut down and closed; the owner's socket
    stays open, the peer sees the end at once); 1 if done, 0 if it was gone already."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        return 1
    except OSError:
        return 0


def close_connections_to_hosts(addresses, rendezvous: Rendezvous | None) -> int:
    """Shut down this process's TCP connections to ``addresses`` (the engines on other
    hosts, whose sockets this host cannot list), except those to the controller's channels
    and ``rendezvous``'s store; returns how many. Nothing is closed when the controller's
    ports are unknown: its channels share an address with the peers on its host."""
    import psutil

    from ..compat.ipyparallel import controller_ports

    controller = controller_ports()
    if not controller:
        return 0
    tcp = rendezvous is not None and rendezvous.kind == "tcp"
    store = {(rendezvous.host, rendezvous.port)} if tcp else set()
    closed = 0
    wanted = set(addresses)
    for conn in psutil.Process().net_connections("tcp"):
        if not conn.raddr or conn.raddr.ip not in wanted or conn.fd < 0:
            continue
        if conn.raddr.port in controller or (conn.raddr.ip, conn.raddr.port) in store or (conn.laddr.ip, conn.laddr.port) in store:
            continue
        closed += _shut_down(conn.fd)
    return closed
