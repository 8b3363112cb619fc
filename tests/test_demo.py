"""The README's main job runs from a shell, start to finish, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest


@pytest.mark.cluster
def test_demo_runs_and_stops_its_cluster():
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpbook", "demo", "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "started 2 engines" in out
    assert "[rank 0] sum = 3" in out and "[rank 1] sum = 3" in out
    assert "every strategy generated the same tokens: True" in out
    assert "stopped the cluster" in out
    # Every process a cluster starts carries its owner's pid (for the owner watch); other
    # clusters running on this machine at the same time are not the demo's.
    leftovers = [p for p in psutil.process_iter() if _owner(p) == str(proc.pid)]
    assert leftovers == []


def _owner(proc: psutil.Process) -> str | None:
    from mpbook.cluster.launch import OWNER_ENV

    try:
        return proc.environ().get(OWNER_ENV)
    except (psutil.Error, OSError):
        return None


def test_demo_rejects_a_bad_engine_count_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "mpbook", "demo", "-n", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: -n 0: a cluster needs at least one engine; use -n 1 or more"
