"""A real Jupyter kernel that ends, however it ends, takes its cluster with it.

The kernel runs `%mp start`, reports its cluster (every PID, every listening port, the
rendezvous folder), and is then shut down, restarted or killed through jupyter_client, as
JupyterLab would do it. Afterwards no process and no listening port of that cluster is left.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from cluster_probe import gone_within

START = "%load_ext mpbook\n%mp start -n 2 --cpu"
REPORT = (
    "import json, cluster_probe\n"
    "_wb = get_ipython().magics_manager.registry['MpMagics'].workbench\n"
    "print('SNAPSHOT' + json.dumps(cluster_probe.snapshot(_wb)))"
)
ALL_REDUCE = "%%mp run\nt = torch.tensor([rank + 1.0])\ndist.all_reduce(t)\nprint('sum', t.item())"


def execute(kc, code: str, timeout_s: float = 120) -> str:
    """Run ``code`` in the kernel; return its stdout, or fail with the kernel's error."""
    out: list[str] = []
    errors: list[str] = []

    def hook(msg):
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append(f"{content['ename']}: {content['evalue']}")

    reply = kc.execute_interactive(code, timeout=timeout_s, output_hook=hook)
    assert reply["content"]["status"] == "ok", errors or reply["content"]
    return "".join(out)


def start_cluster(kc) -> dict:
    assert "started 2 engines" in execute(kc, START)
    assert "[rank 1] sum 3.0" in execute(kc, ALL_REDUCE)
    line = next(l for l in execute(kc, REPORT).splitlines() if l.startswith("SNAPSHOT"))
    snap = json.loads(line[len("SNAPSHOT"):])
    assert len(snap["pids"]) >= 5 and snap["listening"]  # controller, 2 engines, 2 nannies
    assert not set(snap["engine_pids"]) - set(snap["pids"])
    return snap


@pytest.fixture
def kernel():
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()  # inherits this environment: PYTHONPATH, the private IPYTHONDIR
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def kernel_pid(km) -> int:
    return km.provisioner.pid


def report(what: str, seconds: float) -> None:
    print(f"\n{what}: cluster gone {seconds:.2f} s after")


def test_kernel_restart_and_shutdown_each_stop_the_cluster(kernel):
    km, kc = kernel
    snap = start_cluster(kc)
    began = time.monotonic()
    km.restart_kernel()
    assert gone_within(snap, 10) == ([], [])
    report("kernel restart", time.monotonic() - began)
    assert not os.path.exists(snap["rendezvous_dir"])

    kc.wait_for_ready(timeout=60)
    again = start_cluster(kc)  # the new kernel starts another
    assert set(again["pids"]).isdisjoint(snap["pids"])
    pid = kernel_pid(km)
    began = time.monotonic()
    km.shutdown_kernel()  # a shutdown request, as JupyterLab's "Shut Down Kernel" sends
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert gone_within(again, 10) == ([], [])
    report("kernel shutdown", time.monotonic() - began)
    assert not os.path.exists(again["rendezvous_dir"])


def test_killed_kernel_leaves_no_orphan(kernel):
    km, kc = kernel
    snap = start_cluster(kc)
    os.kill(kernel_pid(km), signal.SIGKILL)  # no atexit, no clean-up: the owner watch's case
    began = time.monotonic()
    assert gone_within(snap, 10) == ([], [])
    report("kernel SIGKILL", time.monotonic() - began)
    assert not os.path.exists(snap["rendezvous_dir"])  # rank 0 removed it on its way out
