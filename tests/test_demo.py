"""The README's main job runs from a shell, start to finish, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import psutil


def test_demo_runs_and_stops_its_cluster():
    proc = subprocess.run(
        [sys.executable, "-m", "mpbook", "demo", "--cpu"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "started 2 engines" in out
    assert "[rank 0] sum = 3" in out and "[rank 1] sum = 3" in out
    assert "stopped the cluster" in out
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "mpbook._launch" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_demo_rejects_a_bad_engine_count_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "mpbook", "demo", "-n", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: -n 0: a cluster needs at least one engine; use -n 1 or more"
