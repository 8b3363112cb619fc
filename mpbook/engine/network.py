"""Which of an engine's addresses the other hosts reach, and which interface holds it.

Engines on several hosts meet at an address the hosts share: the one the controller
listens on. Each engine takes the address its host's route to that one leaves from (for
the engine on the controller's own host, that very address), and keeps the process
group's sockets there: the rendezvous store listens on it, and gloo/NCCL bind to the
interface that holds it (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``), rather than on
every interface or on whatever the host name resolves to.
"""

from __future__ import annotations

import socket


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
    return route_source(toward) if toward else host_address()


def route_source(toward: str) -> str:
    """This host's address on the route to ``toward`` (``toward`` itself when it is local).

    Connecting a UDP socket sends nothing: the kernel only picks the route and the source."""
    family = socket.AF_INET6 if ":" in toward else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((toward, 9))
        return probe.getsockname()[0]


def interface_of(address: str) -> str:
    """The name of the network interface that holds ``address``."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    raise RuntimeError(f"no interface of this host holds {address}; its interfaces: "
                       f"{', '.join(sorted(psutil.net_if_addrs()))}")


def listening_socket(address: str) -> socket.socket:
    """A TCP socket listening on ``address`` only, at a free port (for the rendezvous store,
    which would otherwise listen on every interface)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(128)
    return sock
