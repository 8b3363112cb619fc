"""A kernel's first strategy cell, as a person sees it in JupyterLab.

It takes seconds before any token: the kernel resolves the model (importing transformers and
loading its tokenizer), the engines import transformers and the model's code, then load it.
The dashboard must be on screen at once and say which of these is happening, and its final
line must account for the whole time: its parts add up to the "done in" total. A real kernel
(jupyter_client), its widget messages read as the front end gets them.
"""

from __future__ import annotations

import html
import json
import queue
import re
import time

import pytest

from mpbook import MpbookError

CELL = "%%mp data --model tiny --max-new-tokens 8\nHello there\nWhat is a tensor?"
REPORT = """
import json
_wb = get_ipython().magics_manager.registry['MpMagics'].workbench
def _phases(state):
    return dict(state.telemetry.phase_seconds)
print('REPORT' + json.dumps({
    'parts': _mp.cell_parts(), 'cell_seconds': _mp.cell_seconds, 'load_seconds': _mp.load_seconds,
    'import_seconds': _mp.import_seconds, 'phases': _wb.apply(_phases, stream=False)}))
"""


def run(kc, code: str, timeout_s: float = 180) -> tuple[list[tuple[float, str, dict]], float]:
    """Execute ``code``; every iopub message of it as (seconds since the request, type, content)."""
    msg_id = kc.execute(code)
    began = time.monotonic()
    seen = []
    while time.monotonic() - began < timeout_s:
        try:
            msg = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        kind, content = msg["header"]["msg_type"], msg["content"]
        # widget updates come from the kernel's comms, filed under the request too
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append((time.monotonic() - began, kind, content))
        if kind == "status" and content["execution_state"] == "idle":
            return seen, time.monotonic() - began
    raise TimeoutError(f"{code.splitlines()[0]} did not end in {timeout_s} s")


def stdout(seen) -> str:
    return "".join(c["text"] for _, kind, c in seen if kind == "stream")


def statuses(seen) -> list[tuple[float, str]]:
    """What the dashboard's status line said, in order: (seconds since the request, text)."""
    out = []
    for t, kind, content in seen:
        if kind not in ("comm_open", "comm_msg"):
            continue
        value = (content.get("data") or {}).get("state", {}).get("value")
        if isinstance(value, str) and "mpbook: " in value:
            out.append((t, html.unescape(re.sub(r"<[^>]+>", "", value)).split("mpbook: ", 1)[1]))
    return out


def seconds_of(text: str) -> float:
    number, unit = text.rsplit(" ", 1)
    return float(number) / (1000 if unit == "ms" else 1)


@pytest.fixture
def kernel():
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        seen, _ = run(kc, "%load_ext mpbook\n%mp start -n 2 --cpu")
        assert "started 2 engines" in stdout(seen), seen
        yield kc
    finally:
        try:
            run(kc, "%mp stop", timeout_s=60)
        except Exception:
            pass
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_first_strategy_cell_shows_what_happens_at_once_and_its_time_adds_up(kernel):
    kc = kernel
    seen, _ = run(kc, "import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert stdout(seen).strip() == "[]", seen  # the kernel's first cell on a model imports them

    seen, _ = run(kc, CELL)
    errors = [c for _, kind, c in seen if kind == "error"]
    assert not errors, errors
    shown = statuses(seen)
    said = [text for _, text in shown]
    displayed = next(t for t, kind, _ in seen if kind == "display_data")
    first_running = next(t for t, text in shown if text.startswith("running"))

    # On screen at once, saying what the client does while it resolves the model (seconds in
    # a kernel's first cell), before the engines are called.
    assert displayed < 3.0 and first_running - displayed > 1.0, (displayed, first_running, said)
    preparing = [text for t, text in shown if t < first_running]
    assert any(re.fullmatch(r"preparing · [\d.]+ s · resolving the model tiny", text) for text in preparing), said
    # Then what the engines do: they import transformers and the model's code first (seconds
    # on fresh engines), a phase of its own.
    assert any(re.fullmatch(r"running · [\d.]+ s · importing(/loading)?", text) for text in said), said

    # The final line: the call's time, and parts that add up to it.
    final = said[-1]
    total, *parts = final.split(" · ")
    assert total.startswith("done in ")
    named = {}
    for part in parts:
        if m := re.fullmatch(r"(preparing|importing|loading|client & transfer) ([\d.]+ m?s)", part):
            named[m.group(1)] = seconds_of(m.group(2))
        elif m := re.fullmatch(r"(prefill|decode) [\d,]+ tokens?, [\d,.]+ tok/s in ([\d.]+ m?s)", part):
            named[m.group(1)] = seconds_of(m.group(2))
        else:
            assert part.startswith("collectives up to "), (part, final)
    assert {"preparing", "importing", "prefill", "decode"} <= set(named), final
    # each shown part rounds by up to 0.05 s; a part under 0.05 s is left out
    slack = 0.05 * 6
    assert abs(sum(named.values()) - seconds_of(total[len("done in "):])) <= slack, (named, final)

    seen, _ = run(kc, REPORT)
    report = json.loads(next(line for line in stdout(seen).splitlines() if line.startswith("REPORT"))[6:])
    assert sum(s for _, s in report["parts"]) == pytest.approx(report["cell_seconds"])
    assert [name for name, _ in report["parts"]] == ["preparing", "importing", "loading", "prefill", "decode",
                                                     "client & transfer"]
    # The engines' own phases say the same as the line: "loading" is the loading alone (it was
    # the imports too: seconds of "loading" for a 0.2 s load), "importing" the imports.
    for rank, phases in enumerate(report["phases"]):
        assert abs(phases.get("loading", 0.0) - report["load_seconds"][rank]) < 0.1, (rank, phases, report)
        assert abs(phases.get("importing", 0.0) - report["import_seconds"][rank]) < 0.1, (rank, phases, report)
        assert report["import_seconds"][rank] > report["load_seconds"][rank]


def test_a_run_that_ends_before_the_engines_ends_its_dashboard_too(workbench, tiny_folder):
    """The dashboard is on screen from the client's first step; a run refused there (a layout
    that cannot work) must not leave it saying "preparing"."""
    from mpbook.dashboard import Dashboard

    dash = Dashboard(workbench, mode="widget")
    with pytest.raises(MpbookError, match="1 prompt for dp=2 replicas"):
        workbench.generate(["Hi"], strategy="data", model=tiny_folder, max_new_tokens=2, dashboard=dash)
    assert dash.state == "failed" and dash.client_step is None
    assert re.match(r"failed after \d+ ms: MpbookError: 1 prompt for dp=2 replicas", dash.headline), dash.headline
    assert "failed after" in dash.view.status.value
    result = workbench.generate(["Hi", "Ho"], strategy="data", model=tiny_folder, max_new_tokens=2, dashboard=dash)
    assert dash.state == "done" and dash.calls == 2 and dash.headline.startswith("done in ")
    assert sum(seconds for _, seconds in result.cell_parts()) == pytest.approx(result.cell_seconds)


def test_the_final_line_names_every_part_and_they_add_up_to_the_total():
    from mpbook.dashboard.words import done_with_result
    from mpbook.layout import Layout
    from mpbook.results import RunResult

    result = RunResult(
        strategy="data", model="tiny", layout=Layout(dp=2), dtype="float32", microbatches=1, max_new_tokens=8,
        prompts=["a", "b"], prompt_tokens=[6, 6], token_ids=[[1] * 8, [2] * 8], texts=["x", "y"], logits=None,
        prefill_seconds=0.012, decode_seconds=9.04, peak_memory_bytes=[1, 1], weight_bytes=[1, 1],
        kv_cache_bytes=[1, 1], collectives=[{}, {}], collective_seconds=[0.0, 0.0], timeline=[],
        load_seconds=[0.17, 0.16], import_seconds=[2.3, 2.5], prepare_seconds=4.1, cell_seconds=16.6,
    )
    line = done_with_result(result.cell_seconds, result)
    assert line == ("done in 16.6 s · preparing 4.1 s · importing 2.5 s · loading 0.2 s · prefill 12 tokens, "
                    "1,000 tok/s in 12 ms · decode 14 tokens, 1.5 tok/s in 9.0 s · client & transfer 0.8 s")
    # Ranks whose longest parts differ (rank 0 imported longest, rank 1 loaded longest): the
    # parts are the busiest rank's own, so they still add up to the call.
    import dataclasses

    busy = dataclasses.replace(result, load_seconds=[0.1, 3.0], import_seconds=[2.5, 2.0], cell_seconds=19.0,
                               rank_phase_seconds=[{"prefill": 0.01, "decode": 9.0}, {"prefill": 0.012, "decode": 9.04}])
    parts = dict(busy.cell_parts())
    assert (parts["importing"], parts["loading"], parts["decode"]) == (2.0, 3.0, 9.04)
    assert sum(parts.values()) == pytest.approx(19.0) and parts["client & transfer"] == pytest.approx(0.848)
