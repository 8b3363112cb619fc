"""A notebook's side of the multi-host test, run on the first host (tests/test_hosts.py):
starts engines on the hosts over SSH through mpbook, runs every strategy, interrupts, kills
an engine on the far host, takes the far host's link down, stops, and prints what it saw as
JSON (one object on the last line of stdout).

    python tests/hosts_driver.py HOSTS FAR_HOST FAR_LINK_DEVICE
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from mpbook import Workbench
from mpbook.errors import EngineDiedError, MpbookError
from mpbook.models.presets import build_tiny, family_config, save_random
from mpbook.reference import reference

PROMPTS = ["Explain pipeline parallelism in one sentence.", "Hi", "What does an all-reduce do?",
           "Tensor parallel splits every weight matrix"]
NEW_TOKENS = 6
LONG = dict(model="small", max_new_tokens=900, ignore_eos=True)  # seconds of decoding to interrupt
TIMEOUT_S = 20.0  # the collectives' timeout on this cluster


def listening(state):
    """This engine's listening sockets and the interface gloo keeps to (run on each engine;
    sent by value, so it imports what it uses)."""
    import os

    import psutil

    own = psutil.Process().net_connections("tcp")
    return {"listen": sorted({c.laddr.ip for c in own if c.status == psutil.CONN_LISTEN}),
            "ifname": os.environ.get("GLOO_SOCKET_IFNAME", "")}


def run_with_interrupt_after(wb, delay_s: float, **options) -> tuple[float, str]:
    """Generate, SIGINT this process ``delay_s`` in; seconds from the interrupt to the cell's end."""
    sent = []

    def interrupt():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(delay_s, interrupt)
    timer.start()
    try:
        wb.generate(PROMPTS[:2], **LONG, **options)
        outcome = "finished before the interrupt"
    except KeyboardInterrupt:
        outcome = "interrupted"
    ended = time.perf_counter()
    timer.cancel()
    return (ended - sent[0] if sent else -1.0), outcome


OUT: dict = {}  # what was seen so far (printed to stderr if the driver fails)


def main(hosts: str, far_host: str, far_link: str) -> dict:
    out = OUT
    folder = str(build_tiny(tempfile.mkdtemp(prefix="tiny-"), seed=1))
    moe = str(save_random(family_config("mixtral"), tempfile.mkdtemp(prefix="moe-"), seed=3))
    _, tokens = reference(folder, PROMPTS, max_new_tokens=NEW_TOKENS)
    _, moe_tokens = reference(moe, PROMPTS, max_new_tokens=NEW_TOKENS)
    _, small_tokens = reference("small", PROMPTS[:2], max_new_tokens=NEW_TOKENS)

    began = time.perf_counter()
    wb = Workbench.start(hosts=hosts, cpu=True, timeout_s=TIMEOUT_S)
    out["start_s"] = time.perf_counter() - began
    try:
        run_everything(wb, out, folder=folder, tokens=tokens, moe=moe, moe_tokens=moe_tokens,
                       small_tokens=small_tokens, far_host=far_host, far_link=far_link)
    finally:
        from mpbook.cluster.ssh import remote_files

        # what ipyparallel's SSH launchers left on the hosts (one file system here)
        files = [p for paths in remote_files(wb.cluster.ipp_cluster.engines.values()).values() for p in paths]
        began = time.perf_counter()
        wb.stop()
        out["stop_s"] = time.perf_counter() - began
        out["remote_files"] = files
        out["remote_files_left"] = [p for p in files if os.path.exists(p)]
    out["timeout_s"] = TIMEOUT_S

    # ipyparallel's MPI launcher across the hosts: mpiexec (Hydra, over ssh) starts one engine
    # on each, mpbook's collectives go over MPI between them.
    began = time.perf_counter()
    with Workbench.start(hosts="hosta:1,hostb:1", cpu=True, launcher="mpi", timeout_s=TIMEOUT_S) as mpi_wb:
        out["mpi"] = {"start_s": time.perf_counter() - began, "hosts_by_rank": mpi_wb.cluster.hosts,
                      "transports": [e.transport for e in mpi_wb.engines]}
        for strategy in ("tensor", "pipeline"):
            result = mpi_wb.generate(PROMPTS, strategy=strategy, model=folder, max_new_tokens=NEW_TOKENS)
            out["mpi"][strategy] = {"same_tokens": result.token_ids == tokens,
                                    "used": sorted({t for per_rank in result.transports for t in per_rank.values()})}
    return out


def run_everything(wb, out, *, folder, tokens, moe, moe_tokens, small_tokens, far_host, far_link) -> None:
    out["hosts_by_rank"] = wb.cluster.hosts
    out["engine_hosts"] = [e.host for e in wb.engines]
    out["address"] = wb.cluster.address
    out["table"] = wb.table()
    controller = wb.pids()["controller"][0]
    out["controller_listen"] = sorted({c.laddr.ip for c in psutil.Process(controller).net_connections("tcp")
                                       if c.status == psutil.CONN_LISTEN})
    out["engines_network"] = wb.apply(listening, stream=False)
    out["engine_pids"] = [e.pid for e in wb.engines]

    # Every strategy across the hosts, against one device; and where the warnings fall.
    runs = {}
    cases = [("data", {}, folder, tokens), ("pipeline", {}, folder, tokens), ("tensor", {}, folder, tokens),
             ("tensor", {"pp": 2}, folder, tokens), ("pipeline", {"ep": 2}, moe, moe_tokens)]
    for strategy, degrees, model, want in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            result = wb.generate(PROMPTS, strategy=strategy, model=model, max_new_tokens=NEW_TOKENS, **degrees)
        layout = result.layout
        runs[f"{strategy} {degrees}"] = {
            "layout": str(layout),
            "same_tokens": result.token_ids == want,
            "warning": err.getvalue().strip(),
            "tp_groups_hosts": [sorted({wb.cluster.hosts[r] for r in g}) for g in layout.groups(("ep", "tp"))],
        }
    out["runs"] = runs

    # The links between every pair of ranks, and their summary in the status table.
    links = wb.measure_links()
    out["links"] = [[x.low, x.high, x.low_host, x.high_host, x.latency_s, x.bandwidth_bytes_per_s] for x in links]
    wb.status()
    out["status_table"] = wb.table()

    # Interrupts: the cell ends within seconds, and the next cell runs and is right.
    interrupts = {}
    for strategy, degrees in (("pipeline", {}), ("tensor", {"pp": 2}), ("data", {"tp": 2})):
        wb.generate(PROMPTS[:2], strategy=strategy, model="small", max_new_tokens=2, **degrees)  # loaded
        took, outcome = run_with_interrupt_after(wb, 2.0, strategy=strategy, **degrees)
        began = time.perf_counter()
        again = wb.generate(PROMPTS[:2], strategy=strategy, model="small", max_new_tokens=NEW_TOKENS, **degrees)
        interrupts[f"{strategy} {degrees}"] = {"interrupt_to_end_s": took, "outcome": outcome,
                                               "next_cell_s": time.perf_counter() - began,
                                               "next_same_tokens": again.token_ids == small_tokens}
    out["interrupts"] = interrupts
    # what an interrupted cell includes besides the engines' own stop: forming the group again
    began = time.perf_counter()
    wb.cluster.rebuild_group()
    out["rebuild_group_s"] = time.perf_counter() - began

    # An engine killed on the far host, mid-generation: named, then the layout comes back.
    far_rank = max(r for r, h in enumerate(wb.cluster.hosts) if h == far_host)
    far_pid = wb.engines[far_rank].pid

    def kill_far():
        subprocess.run(["ssh", far_host, f"kill -9 {far_pid}"], check=True)
        killed.append(time.perf_counter())

    killed: list[float] = []
    wb.generate(PROMPTS[:2], strategy="pipeline", model="small", max_new_tokens=2)  # loaded
    timer = threading.Timer(2.0, kill_far)
    timer.start()
    try:
        wb.generate(PROMPTS[:2], strategy="pipeline", **LONG)
        out["kill"] = {"error": "none"}
    except (EngineDiedError, MpbookError) as exc:
        out["kill"] = {"error": type(exc).__name__, "message": str(exc),
                       "named_after_s": time.perf_counter() - killed[0] if killed else -1.0, "far_rank": far_rank}
    timer.join()
    began = time.perf_counter()
    wb.restart()
    out["kill"]["restart_s"] = time.perf_counter() - began
    again = wb.generate(PROMPTS, strategy="pipeline", model=folder, max_new_tokens=NEW_TOKENS)
    out["kill"]["after_restart_same_tokens"] = again.token_ids == tokens
    out["kill"]["hosts_after_restart"] = wb.cluster.hosts
    out["engine_pids"] += [e.pid for e in wb.engines]

    # The far host's link goes down mid-generation: reported within the timeout, not hung.
    downed: list[float] = []

    def link_down():
        subprocess.run(["ip", "link", "set", "dev", far_link, "down"], check=True)
        downed.append(time.perf_counter())

    wb.generate(PROMPTS[:2], strategy="pipeline", model="small", max_new_tokens=2)  # loaded
    timer = threading.Timer(2.0, link_down)
    timer.start()
    try:
        wb.generate(PROMPTS[:2], strategy="pipeline", **LONG)
        out["link"] = {"error": "none"}
    except (EngineDiedError, MpbookError) as exc:
        out["link"] = {"error": type(exc).__name__, "message": str(exc),
                       "reported_after_s": time.perf_counter() - downed[0] if downed else -1.0}
    timer.join()
    subprocess.run(["ip", "link", "set", "dev", far_link, "up"], check=True)


if __name__ == "__main__":
    try:
        result = main(*sys.argv[1:4])
    except BaseException:
        print(json.dumps(OUT), file=sys.stderr)
        raise
    sys.stdout.flush()
    print(json.dumps(result))
