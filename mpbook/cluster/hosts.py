"""Engines on several hosts: what a person asks for, where the controller listens, and ranks
placed by host.

``--hosts hosta:2,hostb:2`` asks for two engines on each of two hosts, named as ``ssh``
knows them. The controller listens on the one address of this host that the hosts reach
(the source of the route to them, or ``--ip``), never on every interface, and engines are
told that address, so they dial something that resolves wherever they are.

Ranks follow hosts: the engines of the first host get the first ranks, in engine-id order,
then the next host's. A layout's tensor (and expert) groups are neighbouring ranks
(:mod:`mpbook.layout`), so they stay inside a host whenever a host holds a whole group, and
pipeline stages and data replicas cross hosts, where only activations (or nothing) travel.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MpbookError
from ..layout import Layout

EXAMPLE = "--hosts hosta:2,hostb:2"


@dataclass(frozen=True)
class HostSlots:
    """``n`` engines on the host that ``ssh`` knows as ``name``."""

    name: str
    n: int


def check_hosts(hosts) -> tuple[HostSlots, ...]:
    """``"hosta:2,hostb:2"``, ``{"hosta": 2, "hostb": 2}`` or ``["hosta", "hostb"]`` (one
    engine each) as host slots, in the order given; a clear error for anything else."""
    if isinstance(hosts, str):
        items = [part.strip() for part in hosts.split(",")]
        if not all(items):
            raise MpbookError(f"--hosts {hosts!r}: an empty host name; give host:count pairs, e.g. {EXAMPLE}")
        pairs = []
        for item in items:
            name, _, count = item.rpartition(":") if ":" in item else (item, "", "1")
            pairs.append((name, count))
    elif isinstance(hosts, dict):
        pairs = list(hosts.items())
    elif isinstance(hosts, (list, tuple)):
        pairs = [(name, 1) for name in hosts]
    else:
        raise MpbookError(f"hosts={hosts!r}: give host:count pairs as text ({EXAMPLE}) or a dict {{'hosta': 2}}")
    slots, seen = [], set()
    for name, count in pairs:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise MpbookError(f"--hosts: {name!r} is not a host name; give host:count pairs, e.g. {EXAMPLE}")
        try:
            n = int(count)
            if isinstance(count, bool) or (isinstance(count, float) and count != n):
                raise ValueError
        except (TypeError, ValueError):
            raise MpbookError(f"--hosts: {name}:{count}: the count must be a whole number of engines, "
                              f"e.g. {name}:2") from None
        if n < 1:
            raise MpbookError(f"--hosts: {name}:{n}: a host needs at least one engine; leave the host out instead")
        if name in seen:
            raise MpbookError(f"--hosts: {name} is named twice; give its engine count once, e.g. {name}:{n}")
        seen.add(name)
        slots.append(HostSlots(name, n))
    if not slots:
        raise MpbookError(f"--hosts: no hosts given; e.g. {EXAMPLE}")
    return tuple(slots)


def ssh_hostname(name: str) -> str:
    """The host ``ssh`` would connect to for ``name`` (its configuration may map an alias)."""
    try:
        done = subprocess.run(["ssh", "-G", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return name
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value:
            return value
    return name


def resolve(name: str) -> str:
    """The IPv4 address of host ``name`` as this host (and ``ssh``) sees it."""
    target = ssh_hostname(name)
    try:
        return socket.getaddrinfo(target, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        raise MpbookError(
            f"--hosts: {name} does not resolve here ({target}); give its address instead, or add it to "
            "/etc/hosts or ~/.ssh/config"
        ) from None


def controller_address(slots: Sequence[HostSlots], ip: str | None = None) -> str:
    """The address of this host that every host in ``slots`` reaches: ``ip`` when given (it
    must be one of this host's), else the source of this host's route to them."""
    from ..engine.network import interface_of, route_source

    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise MpbookError(f"--ip {ip!r}: give an IP address of this host, e.g. --ip 192.0.2.1") from None
        try:
            interface_of(ip)
        except RuntimeError:
            raise MpbookError(f"--ip {ip}: no interface of this host has that address; give one it has "
                              "(`ip -br addr` lists them), or leave out --ip") from None
        return ip
    sources = {}
    for slot in slots:
        address = resolve(slot.name)
        try:
            sources[slot.name] = route_source(address)
        except OSError as exc:
            raise MpbookError(f"--hosts: no route from this host to {slot.name} ({address}: {exc}); "
                              "check the network, or give --ip") from None
    remote = {name: src for name, src in sources.items() if not ipaddress.ip_address(src).is_loopback}
    if not remote:
        return "127.0.0.1"  # every host named is this one
    chosen = set(remote.values())
    if len(chosen) > 1:
        raise MpbookError(
            "--hosts: this host reaches them from different addresses ("
            + ", ".join(f"{name} from {src}" for name, src in remote.items())
            + "); give the one they all reach with --ip"
        )
    return chosen.pop()


def rank_order(engine_ids: Sequence[int], hosts: Sequence[str], first: Sequence[str] = ()) -> list[int]:
    """Engine ids in rank order: grouped by host, the hosts in ``first``'s order (then the
    rest in order of their lowest engine id), engine ids ascending inside a host."""
    by_id = dict(zip(engine_ids, hosts))
    order = [h for h in first if h in by_id.values()]
    for eid in sorted(engine_ids):
        if by_id[eid] not in order:
            order.append(by_id[eid])
    return sorted(engine_ids, key=lambda eid: (order.index(by_id[eid]), eid))


def spanning_groups(layout: Layout, hosts: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The tensor and expert groups of ``layout`` whose ranks are on more than one host
    (``hosts`` by rank): (dims, ranks) for each."""
    if len(set(hosts)) < 2 or len(hosts) != layout.world_size:
        return []
    found = []
    for dims in (("ep", "tp"),):
        key = tuple(d for d in dims if getattr(layout, d) > 1)
        if not key:
            continue
        for ranks in layout.groups(key):
            if len({hosts[r] for r in ranks}) > 1:
                found.append(("/".join(key), ranks))
    return found


def span_warning(layout: Layout, hosts: Sequence[str]) -> str | None:
    """One line when a tensor/expert group of ``layout`` must cross hosts, else None."""
    spans = spanning_groups(layout, hosts)
    if not spans:
        return None
    dims, ranks = spans[0]
    where = ", ".join(f"rank {r} on {hosts[r]}" for r in ranks)
    fewest = min(hosts.count(h) for h in hosts)
    return (f"warning: {layout}: the {dims} group of ranks {ranks} spans hosts ({where}); its collectives in every "
            f"layer cross the network. Keep {dims} within one host ({dims} <= {fewest} here) and put "
            "pipeline stages (--pp) or replicas (--dp) across hosts")

