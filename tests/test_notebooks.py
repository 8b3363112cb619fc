"""The tutorial notebooks: committed without outputs, and each runs top to bottom in a real
Jupyter kernel (ipykernel's python3, driven by nbclient) with its default parameters: the
built-in tiny model on 2 CPU engines. Each notebook checks itself (tokens against one device,
collective counts, planner against measurement); any error fails here."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from mpbook.cluster import launch

LAUNCH = launch.__name__  # every process mpbook starts runs `python -m mpbook.cluster.launch`
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = [
    "00_quickstart",
    "01_data_parallel",
    "02_pipeline_parallel",
    "03_tensor_parallel",
    "04_compare_strategies",
    "05_planning",
    "06_explore",
]
CELL_TIMEOUT_S = 240  # one cell; the slowest takes seconds on 2 shared cores

# Run in the kernel after the notebook: processes mpbook started that are still alive. The
# await first lets the kernel's event loop run: ipyparallel reports the engines' exits from it,
# and whatever it prints then lands in this cell's output.
LEFT_RUNNING = f"""
import asyncio
import psutil
await asyncio.sleep(1.0)
left = []
for p in psutil.Process().children(recursive=True):
    try:
        if p.status() != psutil.STATUS_ZOMBIE and {LAUNCH!r} in " ".join(p.cmdline()):
            left.append(p.pid)
    except psutil.NoSuchProcess:
        pass
print("left running:", left)
"""


def test_every_notebook_is_here():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{path.name}: the first code cell must be the one tagged 'parameters'"
    assert "MODEL = " in code[0].source and "ENGINES = " in code[0].source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_the_quickstart_introduces_every_strategy():
    """Its first words count mpbook's strategies and name each one (expert parallel too)."""
    from mpbook.layout import STRATEGIES

    intro = nbformat.read(NOTEBOOKS_DIR / "00_quickstart.ipynb", as_version=4).cells[0].source
    count = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}[len(STRATEGIES)]
    assert f"with one of {count} strategies:" in intro
    assert [s for s in STRATEGIES if f"**{s} parallel**" not in intro] == []


@pytest.mark.cluster
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_kernel_and_stops_its_cluster(path, monkeypatch, request):
    from nbclient import NotebookClient

    if path.stem == "00_quickstart" and _quickstart_runs_in_the_browser(request.session):
        pytest.skip("the quickstart runs whole in JupyterLab in this session (test_browser.py), checked the "
                    "same way: every cell, nothing on stderr, no traceback, every process ended")

    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this environment (the test IPYTHONDIR and MPBOOK_CACHE of conftest)
    # and runs in the notebooks' folder, as it would when opened there from a checkout. No GPU
    # is visible to it, so the defaults (2 engines) mean CPU engines on any machine.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError on any error
        check = nbformat.v4.new_code_cell(LEFT_RUNNING)
        nb.cells.append(check)
        client.execute_cell(check, len(nb.cells) - 1)

    streams = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
    # Nothing on stderr, and no traceback printed anywhere (a library's log of a crashed
    # process goes to stdout): a reader sees only what the notebook means to show.
    noise = [f"cell {i}: {o.text[-800:]}" for i, o in streams if o.name == "stderr" or "Traceback" in o.text]
    assert not noise, "the notebook printed errors or logs:\n" + "\n".join(noise)
    assert "left running: []" in check.outputs[0].text, f"{path.name} left its cluster running: {check.outputs[0].text}"
    if path.stem == "00_quickstart":
        shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "display_data"]
        widgets = [o for o in shown if "application/vnd.jupyter.widget-view+json" in o.data]
        assert len(widgets) >= 5  # the standing dashboard and one per strategy cell


def _quickstart_runs_in_the_browser(session) -> bool:
    """Whether test_browser.py's quickstart test is collected in this session and can run
    (Chromium and Playwright here): running the notebook twice would only cost the time."""
    import importlib.util
    import os

    from test_browser import CHROMIUM

    collected = any(item.name == "test_quickstart_runs_in_jupyterlab_and_its_dashboard_moves"
                    for item in session.items)
    return collected and os.path.exists(CHROMIUM) and importlib.util.find_spec("playwright") is not None
