"""Hosts made on this machine for the multi-host tests: network namespaces joined by a veth
pair on 192.0.2.0/24 (the documentation range, and nothing else), each with its own hostname
(a UTS namespace), its own ``/etc/hosts`` and an ``sshd`` of its own, so that mpbook starts
engines there over SSH exactly as on real machines.

    with Hosts.made(["hosta", "hostb"]) as hosts:
        hosts.run("hosta", [sys.executable, "driver.py"])   # a notebook's process on host a

Every process this starts is recorded by pid and ended by pid; the namespaces, their
``/etc/netns`` folders and the keys are removed at the end. It needs root and the ``ip``
command (``Hosts.missing()`` says what is missing); Debian's ``openssh-server`` gives
``sshd`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

SUBNET = "192.0.2"  # RFC 5737 TEST-NET-1: never routed anywhere
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@dataclass
class Host:
    name: str
    address: str
    netns: str  # the network namespace's name (unique to this test process)
    sshd: subprocess.Popen | None = None
    device: str = ""  # its end of the veth pair


@dataclass
class Hosts:
    hosts: dict[str, Host]
    folder: str  # keys, configs, known_hosts: private to this test
    started: list[subprocess.Popen] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (netns, device) of each veth end

    # ------------------------------------------------------------------ making them
    @staticmethod
    def missing() -> str | None:
        """Why hosts cannot be made here, or None."""
        if os.geteuid() != 0:
            return "making network namespaces needs root"
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2) to make network namespaces"
        if shutil.which("unshare") is None:
            return "no `unshare` command (util-linux) to give each host its own hostname"
        if not os.access(SSHD, os.X_OK):
            return f"no {SSHD}: install Debian's openssh-server (`.ci/run` does)"
        return None

    @classmethod
    @contextmanager
    def made(cls, names: list[str]):
        tag = f"mpbook{os.getpid()}"
        hosts = {name: Host(name, f"{SUBNET}.{i + 1}", f"{tag}-{name}") for i, name in enumerate(names)}
        made = cls(hosts, tempfile.mkdtemp(prefix="mpbook-hosts-"))
        try:
            made._make_network(tag)
            made._make_ssh()
            yield made
        finally:
            made.remove()

    def _make_network(self, tag: str) -> None:
        hosts = list(self.hosts.values())
        for host in hosts:
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # `ip netns exec` binds each file of /etc/netns/NAME over /etc inside the namespace.
            etc = f"/etc/netns/{host.netns}"
            os.makedirs(os.path.join(etc, "ssh"))
            with open(os.path.join(etc, "hosts"), "w") as f:
                f.write("127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in hosts))
        # A bridge in the first host's namespace joins every host (one veth pair each), so a
        # host's link can be taken down alone.
        first = hosts[0]
        _ip("-n", first.netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", first.netns, "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            inner, outer = f"{tag[-6:]}h{i}", f"{tag[-6:]}b{i}"
            _ip("link", "add", inner, "netns", host.netns, "type", "veth", "peer", "name", outer, "netns", first.netns)
            self.links.append((first.netns, outer))
            _ip("-n", first.netns, "link", "set", outer, "master", "br0")
            _ip("-n", first.netns, "link", "set", outer, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inner)
            _ip("-n", host.netns, "link", "set", inner, "up")
            host.device = inner

    def _make_ssh(self) -> None:
        folder = self.folder
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
        key = os.path.join(folder, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        shutil.copy(key + ".pub", os.path.join(folder, "authorized_keys"))
        known = []
        for host in self.hosts.values():
            host_key = os.path.join(folder, f"host_{host.name}")
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
            with open(host_key + ".pub") as f:
                kind, public = f.read().split()[:2]
            known.append(f"{host.name},{host.address} {kind} {public}\n")
            config = os.path.join(folder, f"sshd_{host.name}")
            with open(config, "w") as f:
                f.write(
                    f"ListenAddress {host.address}\nHostKey {host_key}\n"
                    f"AuthorizedKeysFile {folder}/authorized_keys\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    f"PidFile none\nPrintMotd no\nSubsystem sftp {SFTP_SERVER}\n"
                    # the engines' scp and waits come in several at a time
                    "MaxStartups 100\nMaxSessions 100\n"
                )
        with open(os.path.join(folder, "known_hosts"), "w") as f:
            f.writelines(known)
        for host in self.hosts.values():
            with open(f"/etc/netns/{host.netns}/ssh/ssh_config", "w") as f:
                f.write(f"Host *\n  IdentityFile {key}\n  UserKnownHostsFile {folder}/known_hosts\n"
                        "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")
            host.sshd = self.start(host.name, [SSHD, "-D", "-e", "-f", os.path.join(folder, f"sshd_{host.name}")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for host in self.hosts.values():
            _wait_listening(host.sshd.pid, 22, host.sshd)

    # ------------------------------------------------------------------ using them
    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run on host ``name``: in its network namespace, with its hostname."""
        host = self.hosts[name]
        # ip netns exec and unshare exec what follows, and so does the shell: the pid of the
        # started process is the pid of ``argv``.
        quoted = " ".join(_quote(a) for a in argv)
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c", f"hostname {host.name} && exec {quoted}"]

    def start(self, name: str, argv: list[str], **popen) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(name, argv), **popen)
        self.started.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout_s: float, **popen) -> subprocess.CompletedProcess:
        proc = self.start(name, argv, **popen)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{argv} on {name} ran past {timeout_s} s; its output:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def link_down(self, name: str) -> None:
        """Take host ``name``'s link down (as if its cable were pulled)."""
        i = list(self.hosts).index(name)
        netns, device = self.links[i]
        _ip("-n", netns, "link", "set", device, "down")

    def processes(self) -> list[psutil.Process]:
        """Every process running in one of these hosts' network namespaces."""
        found = []
        for netns in [h.netns for h in self.hosts.values()]:
            out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
            for pid in out.split():
                try:
                    found.append(psutil.Process(int(pid)))
                except psutil.NoSuchProcess:
                    pass
        return found

    # ------------------------------------------------------------------ the end
    def remove(self) -> None:
        for proc in reversed(self.started):
            _end(proc)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{host.netns}", ignore_errors=True)
        if os.path.isdir("/etc/netns") and not os.listdir("/etc/netns"):
            os.rmdir("/etc/netns")
        shutil.rmtree(self.folder, ignore_errors=True)

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()
                and line.split()[0] in {h.netns for h in self.hosts.values()}]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _end(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """End one process this test started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports listened on in the network namespace of process ``pid`` (psutil reads
    this process's own namespace, so read the process's view in /proc)."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _wait_listening(pid: int, port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd (pid {pid}) exited with status {proc.returncode}")
        if port in listening_ports(pid):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd (pid {pid}) is not listening on port {port} after {timeout_s} s")


if __name__ == "__main__":  # try it by hand: python tests/hosts.py
    with Hosts.made(["hosta", "hostb"]) as made:
        print(made.run("hosta", ["ssh", "hostb", "hostname; ip -br addr"], 30, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        print(made.run("hostb", ["sh", "-c", "hostname; cat /etc/hosts"], 30, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    sys.exit(0)
