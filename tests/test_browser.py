"""A real browser on a real JupyterLab: headless Chromium, driven by Playwright, opens the
quickstart notebook, runs all its cells, and reads the live dashboard widget from the page
while the long cell runs; and drives mpbook.explore's panel: moves a control, reads the new
prediction, presses Run, reads the new row. Needs Debian's Chromium (/usr/bin/chromium); skipped with that
reason where it is missing (Playwright's own browser download cannot work here)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster_probe import alive

pytestmark = [pytest.mark.browser, pytest.mark.cluster]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium's sandbox refuses to run as root
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "00_quickstart.ipynb"
WATCH_MARKER = "-o watch_run"  # the quickstart's long cell, the one whose dashboard is read
RUN_ALL_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _end(procs: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """Terminate, then kill, whichever of ``procs`` still run."""
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


class JupyterLab:
    """JupyterLab on 127.0.0.1 with a token, serving a private folder; stop() ends it and
    everything it started (kernels, and the engines a kernel started)."""

    def __init__(self, tmp_path: Path, notebooks: tuple[Path, ...] = (NOTEBOOK,)):
        self.root = tmp_path / "root"
        self.root.mkdir()
        for notebook in notebooks:
            shutil.copy(notebook, self.root / notebook.name)
        settings = tmp_path / "settings"
        # Every cell stays in the page (no windowing), so the dashboard's DOM is there to read;
        # no news or update checks (nothing may be fetched).
        for name, value in {
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(value))
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to run all cells
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        # The kernel inherits this environment: the tests' IPYTHONDIR and MPBOOK_CACHE, and no
        # visible GPU, so that the notebook's defaults (2 engines) mean CPU engines anywhere.
        env = dict(
            os.environ,
            JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
            JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
            CUDA_VISIBLE_DEVICES="",
        )
        self.log_path = tmp_path / "jupyterlab.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started: set[int] = {self.proc.pid}

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self._api("/api/status") as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"JupyterLab did not answer within {timeout_s:.0f} s:\n{self.log()}")

    def _api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        return urllib.request.urlopen(request, timeout=5)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def note_children(self) -> None:
        self.started |= {p.pid for p in _descendants(self.proc.pid)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.note_children()
            children = _descendants(self.proc.pid)
            try:  # the polite way: the server shuts its kernels down (their engines with them)
                self._api("/api/shutdown", method="POST").close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            _end([psutil.Process(self.proc.pid)] if self.proc.poll() is None else [])
            _end(children)
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def chromium_path():
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"needs Debian's Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium "
            "(Playwright's own browser download cannot work here)"
        )
    pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python: pip install playwright")
    return CHROMIUM


@pytest.fixture
def jupyterlab(tmp_path):
    lab = JupyterLab(tmp_path)
    try:
        lab.wait_ready()
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def page(chromium_path):
    from playwright.sync_api import sync_playwright

    before = {p.pid for p in psutil.Process().children()}
    with sync_playwright() as pw:
        # Playwright's driver is this process's new child; Chromium runs under it.
        drivers = [p for p in psutil.Process().children() if p.pid not in before]
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.mpbook_drivers = drivers
            yield page
            started = drivers + [c for d in drivers for c in _descendants(d.pid)]
        finally:
            browser.close()
    _end(started if "started" in locals() else drivers)  # whatever outlived the driver's own stop


# --------------------------------------------------------------------------- page scripts
NOTEBOOK_READY = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
    return !!(panel && panel.content && panel.context && panel.context.isReady && kernel && kernel.status === 'idle');
}"""

RUN_ALL = """() => {
    window.__mpbookRunAll = 'running';
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        (ok) => { window.__mpbookRunAll = 'finished: ' + ok; },
        (err) => { window.__mpbookRunAll = 'failed: ' + err; });
}"""

# The dashboard widget in the output of the cell whose source holds `marker`: its status line,
# per column the text of rank 0's and rank 1's cells, and the first prompt's generated text so
# far (CSS classes set by mpbook).
READ_DASHBOARD = """(marker) => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    const cell = cells.find((c) => c.model.sharedModel.getSource().includes(marker));
    const dash = cell && cell.node.querySelector('.mpbook-dashboard');
    if (!dash) return null;
    const text = (el) => (el ? el.textContent.trim() : null);
    const column = (name) => [0, 1].map((r) => text(dash.querySelector(`.mpbook-rank-${r}.mpbook-col-${name}`)));
    return {
        status: text(dash.querySelector('.mpbook-status')),
        phase: column('phase'), tokens: column('tokens-s'), memory: column('memory'),
        peak: column('peak'), collectives: column('collectives'),
        plot: !!dash.querySelector('.mpbook-throughput svg'),
        prompt: text(dash.querySelector('.mpbook-prompt-0 .mpbook-generated')),
    };
}"""

# Where the dashboard's rows of the cell whose source holds `marker` end, against what its grid
# shows and lets one scroll to; rank 0's decode step text.
COLUMNS_REACHED = """(marker) => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    const cell = cells.find((c) => c.model.sharedModel.getSource().includes(marker));
    const grid = cell.node.querySelector('.mpbook-dashboard .mpbook-grid');
    const step = grid.querySelector('.mpbook-rank-0.mpbook-col-decode-step');
    return {
        overflowX: getComputedStyle(grid).overflowX, scrollWidth: grid.scrollWidth, clientWidth: grid.clientWidth,
        gridLeft: grid.getBoundingClientRect().left, stepRight: step.getBoundingClientRect().right,
        step: step.textContent.trim(),
    };
}"""

OUTCOME = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const cells = panel.content.widgets.filter((c) => c.model.type === 'code');
    return {
        state: window.__mpbookRunAll,
        kernel: kernel ? kernel.status : null,
        counts: cells.map((c) => c.model.executionCount),
        errors: cells.flatMap((c, i) => c.model.outputs.toJSON()
            .filter((o) => o.output_type === 'error')
            .map((o) => `cell ${i}: ${o.ename}: ${o.evalue}`)),
        last: cells.length ? cells[cells.length - 1].model.outputs.toJSON()
            .map((o) => o.text || '').join('') : '',
        dashboards: document.querySelectorAll('.mpbook-dashboard').length,
        noise: cells.flatMap((c, i) => c.model.outputs.toJSON()
            .filter((o) => o.output_type === 'stream' && (o.name === 'stderr' || String(o.text).includes('Traceback')))
            .map((o) => `cell ${i}: ${String(o.text).slice(-800)}`)),
    };
}"""


def _number(text: str | None) -> float | None:
    """'12.5' or '1.2k' -> a number; '–' (nothing yet) -> None."""
    if not text or text == "–":
        return None
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


def test_quickstart_runs_in_jupyterlab_and_its_dashboard_moves(page, jupyterlab, tmp_path):
    page.goto(f"{jupyterlab.url}/lab/tree/{NOTEBOOK.name}?token={jupyterlab.token}")
    page.wait_for_function(NOTEBOOK_READY, timeout=120_000, polling=250)
    page.evaluate(RUN_ALL)

    # While the long cell runs, read its dashboard from the page four times a second.
    samples = []
    deadline = time.monotonic() + RUN_ALL_TIMEOUT_S
    while time.monotonic() < deadline:
        seen = page.evaluate(READ_DASHBOARD, WATCH_MARKER)
        if seen is not None:
            samples.append(seen)
            if "done in" in (seen["status"] or "") or "failed" in (seen["status"] or ""):
                break
            if sum(s["phase"][0] == "decode" for s in samples) == 4:
                cell = page.locator(".jp-CodeCell", has_text=WATCH_MARKER).first
                cell.scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / "quickstart-running.png"))
        if page.evaluate("() => window.__mpbookRunAll") != "running":
            break  # run-all ended (an error stops it) before the long cell's dashboard finished
        jupyterlab.note_children()
        time.sleep(0.25)

    page.wait_for_function(
        """() => window.__mpbookRunAll !== 'running'
             && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'""",
        timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500,
    )
    outcome = page.evaluate(OUTCOME)
    settled = page.evaluate(READ_DASHBOARD, WATCH_MARKER)  # the long cell's dashboard, at rest
    page.screenshot(path=str(tmp_path / "quickstart-finished.png"))

    # Every cell ran, none has an error output, and the last one stopped the cluster.
    # (a kernel that died leaves no error output: the server's log says so)
    assert not outcome["errors"], (outcome, jupyterlab.log())
    assert outcome["state"].startswith("finished"), (outcome, jupyterlab.log())
    assert all(isinstance(n, int) and n > 0 for n in outcome["counts"]), (outcome, jupyterlab.log())
    assert "stopped the cluster" in outcome["last"], outcome["last"]
    # nothing on stderr and no traceback anywhere: a reader sees only what the notebook means to show
    assert not outcome["noise"], "the notebook printed errors or logs:\n" + "\n".join(outcome["noise"])
    assert outcome["dashboards"] >= 6  # the standing one, %%mp run's, one per strategy cell

    # The dashboard rendered as widgets in the page, and its numbers moved while the cell ran.
    running = [s for s in samples if (s["status"] or "").startswith("●") or "running" in (s["status"] or "")]
    decoding = [s for s in running if s["phase"][0] == "decode"]
    assert len(decoding) >= 2, [(s["status"], s["phase"]) for s in samples]
    first, last = decoding[0], decoding[-1]
    assert first["status"] != last["status"]  # "running · 1.2 s" -> "running · 2.9 s"
    assert first["collectives"] != last["collectives"]  # seconds in all-reduces grow token by token
    rates = [_number(s["tokens"][0]) for s in decoding]
    assert any(r and r > 0 for r in rates), rates
    # (a cell read while the widget re-renders it can be empty for a moment: those reads say nothing)
    shown = [m for s in decoding for m in s["memory"] if m and m != "–"]  # "–": no sample from that rank yet
    assert shown and all("MiB" in m or "GiB" in m for m in shown), [s["memory"] for s in decoding]
    assert all(" / " in m for m in last["memory"]), last["memory"]  # against the host's memory
    assert last["plot"]
    # the first prompt's text grew in the page while the cell ran
    texts = [s["prompt"] for s in running if s["prompt"]]
    assert len(set(texts)) >= 3 and len(texts[-1]) > len(texts[0]), texts
    assert "done in" in samples[-1]["status"], samples[-1]["status"]  # seen while watching
    assert "done in" in settled["status"] and "tokens" in settled["status"], settled["status"]
    assert settled["phase"] == ["idle", "idle"]
    # Every column can be reached: rows wider than the notebook (a window 900 px wide) scroll
    # sideways (ipywidgets' boxes do), up to the decode step's parts, the last column here.
    page.set_viewport_size({"width": 900, "height": 1000})
    page.wait_for_timeout(500)  # JupyterLab lays the panel out again
    reach = page.evaluate(COLUMNS_REACHED, WATCH_MARKER)
    page.set_viewport_size({"width": 1400, "height": 1000})
    assert reach["step"].startswith(tuple("0123456789")) and "compute" in reach["step"], reach
    assert reach["stepRight"] <= reach["gridLeft"] + reach["scrollWidth"] + 1, reach
    assert reach["scrollWidth"] <= reach["clientWidth"] or reach["overflowX"] in ("auto", "scroll"), reach
    page.locator(".mpbook-dashboard").last.scroll_into_view_if_needed()  # the long cell's, done
    page.screenshot(path=str(tmp_path / "quickstart-finished.png"))
    assert (tmp_path / "quickstart-finished.png").stat().st_size > 0

    # Clean-up, checked (the fixtures do the same, unchecked, when an assertion above fails):
    # closing the browser ends Chromium, stopping the server ends its kernel and the engines.
    chromium = [c.pid for d in page.mpbook_drivers for c in _descendants(d.pid)]
    assert chromium, "no Chromium process found under Playwright's driver"
    page.context.browser.close()
    jupyterlab.stop()
    deadline = time.monotonic() + 10
    while alive(chromium) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(chromium) == []
    assert len(jupyterlab.started) >= 4  # the server, the kernel, the controller and engines it started
    assert alive(jupyterlab.started) == []


# --------------------------------------------------------------------------- mpbook.explore
EXPLORE_CELLS = [
    "import mpbook\nfrom mpbook import Workbench\nwb = Workbench.start(2)",
    "explorer = mpbook.explore('tiny', engines=wb, batch=4, new_tokens=8)\nexplorer",
]

READ_EXPLORE = """() => {
    const panel = document.querySelector('.mpbook-explore');
    if (!panel) return null;
    const text = (el) => (el ? el.textContent.trim() : null);
    const pressed = (dim) => text(panel.querySelector(`.mpbook-explore-${dim} .mod-active`));
    return {
        tokens: text(panel.querySelector('.mpbook-explore-tokens')),
        status: text(panel.querySelector('.mpbook-explore-status')),
        dp: pressed('dp'), tp: pressed('tp'),
        rows: [...panel.querySelectorAll('.mpbook-explore-rows tbody tr')].map(
            (tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())),
        run_disabled: !!(panel.querySelector('.mpbook-explore-run') || {}).disabled,
    };
}"""


def _explore_notebook(folder: Path) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    path = folder / "explore.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in EXPLORE_CELLS],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}}), path)
    return path


def test_explore_panel_predicts_as_a_control_moves_and_adds_a_row_on_run(page, tmp_path):
    lab = JupyterLab(tmp_path, notebooks=(_explore_notebook(tmp_path),))
    try:
        lab.wait_ready()
        page.goto(f"{lab.url}/lab/tree/explore.ipynb?token={lab.token}")
        page.wait_for_function(NOTEBOOK_READY, timeout=120_000, polling=250)
        page.evaluate(RUN_ALL)
        page.wait_for_function(
            "() => { const t = document.querySelector('.mpbook-explore .mpbook-explore-tokens'); "
            "return t && t.textContent.trim().length > 0; }", timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)
        before = page.evaluate(READ_EXPLORE)
        assert (before["dp"], before["tp"]) == ("2", "1"), before  # data parallel first
        assert before["rows"] == [] and not before["run_disabled"], before

        # Move tp to 2: the panel completes dp to 1 and predicts again, from the page's click.
        page.locator(".mpbook-explore-tp button", has_text="2").click()
        page.wait_for_function(
            "(old) => { const t = document.querySelector('.mpbook-explore-tokens'); "
            "return t && t.textContent.trim() !== old; }", arg=before["tokens"], timeout=30_000, polling=250)
        moved = page.evaluate(READ_EXPLORE)
        assert (moved["dp"], moved["tp"]) == ("1", "2"), moved
        assert float(moved["tokens"].replace(",", "")) > 0 and "dp=1 x pp=1 x tp=2" in moved["status"], moved

        # Run: the layout runs on the cluster and its row appears with prediction and measurement.
        page.locator(".mpbook-explore-run").click()
        page.wait_for_function(
            "() => document.querySelectorAll('.mpbook-explore-rows tbody tr').length === 1",
            timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)
        done = page.evaluate(READ_EXPLORE)
        (row,) = done["rows"]
        assert row[0] == "dp=1 x pp=1 x tp=2", row
        predicted, measured = float(row[4]), float(row[5])
        assert predicted == pytest.approx(float(moved["tokens"].replace(",", "")), rel=0.01, abs=1)
        assert measured > 0 and row[6].endswith("%"), row
        page.locator(".mpbook-explore-rows").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "explore.png"))
    finally:
        lab.stop()
    assert alive(lab.started) == []
