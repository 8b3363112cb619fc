"""The live dashboard on real engines: widget values while a cell runs, the end state, the
text fallback (IPython terminal shell, a script), and a real Jupyter kernel."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time

import pytest
from IPython.core.error import UsageError

import mpbook.dashboard
from mpbook import RankError
from mpbook.dashboard import Dashboard

# Prefill for 1 s, then decode at about 20 tokens/s per rank for ~2 s: 56 tokens a rank, and each
# rank is its own replica here, so 112 for the cluster.
GENERATE_CELL = """
import time
with telemetry.phase_scope("prefill"):
    time.sleep(1.0)  # four snapshot periods, so that some refresh surely shows it
    telemetry.add_tokens("prefill", 16)
with telemetry.phase_scope("decode"):
    for _ in range(20):
        time.sleep(0.1)
        telemetry.add_tokens("decode", 2)
"""


def test_widget_values_change_while_a_cell_runs(workbench):
    dash = Dashboard(workbench, mode="widget")
    frames = []  # (seconds since start, refreshes, grid values, status) at each tick of the wait loop
    began = time.monotonic()

    def tick():
        frames.append((time.monotonic() - began, dash.refreshes, dash.view.values(), dash.view.status.value))

    workbench.run(GENERATE_CELL, dashboard=dash, on_tick=tick)
    seconds = frames[-1][0]
    # refreshed at least twice a second while the cell ran
    assert dash.refreshes >= 2 * seconds, (dash.refreshes, seconds)
    for rank in workbench.ranks:
        phases = [f[2][rank]["phase"] for f in frames]
        order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
        assert [p for p in order if p in ("prefill", "decode")] == ["prefill", "decode"], order
        decoding = [float(f[2][rank]["tokens/s"]) for f in frames if f[2][rank]["phase"] == "decode"]
        # 2 tokens every 0.1 s: about 20 tokens/s (generous: the machine is shared)
        assert decoding and 5 < max(decoding) < 80, decoding
        assert {f[2][rank]["host"] for f in frames} == {workbench.engines[rank].host}
        assert "MiB" in frames[-1][2][rank]["memory"] or "GiB" in frames[-1][2][rank]["memory"]
    statuses = {f[3] for f in frames}
    assert sum("running" in s for s in statuses) >= 3  # the elapsed time moved on
    final = dash.view.status.value
    assert "✓" in final and "done in" in final and "112 tokens (decode 80, prefill 32)" in final
    assert dash.state == "done"
    # the plot of the cluster's tokens/s: every refresh added a point, and it rose above 0
    assert len(dash.history) >= 4 and max(dash.history) > 10
    assert "<polyline" in dash.view.plot.value


def test_the_end_state_names_the_rank_that_failed(workbench):
    dash = Dashboard(workbench, mode="widget")
    with pytest.raises(RankError):
        workbench.run("import time\ntime.sleep(0.3)\nif rank == 1:\n    raise ValueError('bad shard')", dashboard=dash)
    status = dash.view.status.value
    assert "✗" in status and "failed on rank 1" in status and "ValueError: bad shard" in status
    values = dash.view.values()
    assert values[1]["phase"] == "failed" and values[0]["phase"] == "idle"
    # the next call starts clean
    workbench.run("pass", dashboard=dash)
    assert "✓" in dash.view.status.value and dash.view.values()[1]["phase"] == "idle"


def test_a_broken_display_never_costs_the_call(workbench, caplog):
    closed = io.StringIO()
    closed.close()
    dash = Dashboard(workbench, mode="text", text_every_s=0.0, out=closed)
    with caplog.at_level("WARNING", logger="mpbook.dashboard"):
        workbench.run("import time\ntime.sleep(0.5)\nx = rank", dashboard=dash)
    assert "the mpbook dashboard stopped updating" in caplog.text
    assert workbench.client[workbench.engine_ids()].pull("x", block=True) == [0, 1]


def test_text_fallback_in_a_terminal_shell(shell, capsys, monkeypatch):
    monkeypatch.setattr(mpbook.dashboard, "TEXT_EVERY_S", 0.8)
    assert shell.run_cell("%mp start -n 2 --cpu").success
    capsys.readouterr()

    result = shell.run_cell("%%mp run\n" + GENERATE_CELL)
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[mpbook")]
    # a few compact lines: one per rank (plus the total) at most every 0.8 s of a ~2.5 s cell
    assert 2 <= len(lines) <= 3 * 5, out
    assert any("rank 0" in line and "tok/s" in line for line in lines)
    assert any("decode" in line for line in lines)
    assert "mpbook: done in" in out and "112 tokens (decode 80, prefill 32)" in out
    assert "Traceback" not in out

    # a quick cell without tokens prints nothing extra; --no-dashboard prints no dashboard at all
    assert shell.run_cell("%%mp run\nprint('hi', rank)").success
    assert "mpbook" not in capsys.readouterr().out
    assert shell.run_cell("%%mp run --no-dashboard\n" + GENERATE_CELL).success
    assert "mpbook" not in capsys.readouterr().out

    # no event loop between commands here: the standing dashboard shows the engines once
    assert shell.run_cell("%mp dashboard").success
    out = capsys.readouterr().out
    assert "the engines now" in out and "rank 1 cpu" in out and "idle" in out
    result = shell.run_cell("%mp dashboard --period 0")
    assert isinstance(result.error_in_exec, UsageError) and "argument --period: '0': refresh every" in str(result.error_in_exec)
    assert shell.run_cell("%mp stop").success


def test_text_fallback_in_a_script(tmp_path):
    script = tmp_path / "watch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import mpbook.dashboard
            from mpbook import Workbench
            from mpbook.dashboard import Dashboard

            mpbook.dashboard.TEXT_EVERY_S = 1.0
            with Workbench.start(2, cpu=True) as wb:
                assert Dashboard(wb).mode == "text"
                wb.run({GENERATE_CELL!r}, dashboard=True)
            print("finished")
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("[mpbook")]
    assert 2 <= len(rows) <= 3 * 3, out
    assert "mpbook: done in" in out and out.rstrip().endswith("finished")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- a real kernel
def _execute(kc, code: str, timeout: float = 120.0):
    """Run ``code`` in the kernel; return its reply and every IOPub message until it is idle
    (whatever their parent: a standing dashboard's updates belong to an earlier cell)."""
    msg_id = kc.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        msg["received"] = time.monotonic()
        messages.append(msg)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def _values(messages) -> list[tuple[float, str]]:
    """(time received, value) of every widget value update in ``messages``."""
    return [
        (m["received"], m["content"]["data"]["state"]["value"])
        for m in messages
        if m["msg_type"] == "comm_msg" and "value" in m["content"]["data"].get("state", {})
    ]


def _text(messages) -> str:
    return "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")


def test_in_a_jupyter_kernel_the_widgets_update_live_and_the_standing_dashboard_refreshes():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _execute(kc, "%load_ext mpbook\n%mp start -n 2 --cpu")
        shown = _execute(kc, "%mp dashboard --period 0.3")
        assert any(
            "application/vnd.jupyter.widget-view+json" in m["content"].get("data", {})
            for m in shown
            if m["msg_type"] == "display_data"
        )

        ran = _execute(kc, "%%mp run\n" + GENERATE_CELL)
        # the cell's own dashboard was displayed, then updated many times while it ran
        assert sum(m["msg_type"] == "display_data" for m in ran) == 1
        running = [(t, v) for t, v in _values(ran) if "running ·" in v]
        assert len(running) >= 4 and running[-1][0] - running[0][0] >= 1.0
        rates = {v for _, v in _values(ran) if v.replace(".", "", 1).isdigit() and float(v) > 5}
        assert len(rates) >= 2  # tokens/s labels took several values
        done = [v for _, v in _values(ran) if "done in" in v]
        assert done and "112 tokens (decode 80, prefill 32)" in done[-1]

        # between cells the standing dashboard asks the engines itself
        idle = _execute(kc, "import asyncio\nawait asyncio.sleep(1.5)\nstanding = get_ipython().magics_manager.registry['MpMagics'].standing\nprint('polls', standing.polls, standing.running)")
        assert any("engines idle" in v for _, v in _values(idle))
        polls = int(_text(idle).split()[1])
        assert polls >= 3 and "True" in _text(idle)

        stopped = _execute(kc, "%mp stop\nprint('still refreshing:', standing.running)")
        assert "still refreshing: False" in _text(stopped)
        assert any("the cluster stopped" in v for _, v in _values(stopped))
        after = _execute(kc, "import asyncio\nawait asyncio.sleep(0.5)\nprint('task done:', standing._task.done())")
        assert "task done: True" in _text(after)  # and the kernel carries on
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
