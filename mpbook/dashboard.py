"""The live dashboard: one row per engine, fed by the engines' telemetry snapshots.

Engines publish running totals (:mod:`mpbook.publish`); the client turns differences of
totals into rates. The wait loop in :mod:`mpbook.remote` calls the dashboard's tick about
twenty times a second; the view refreshes at most every ``refresh_s``.

In a notebook the view is a widget built and displayed once, whose values then change: a
status line, a grid of labels (rank, host, device, memory, peak, phase, tokens/s, time in
collectives) and a small SVG plot of the cluster's tokens/s. Anywhere else (a terminal
IPython, a script, ``python -m mpbook demo``) the same figures print as a few lines of text.

    >>> wb.run(code, dashboard=True)            # a dashboard for this call
    >>> dash = Dashboard(wb); wb.apply(fn, dashboard=dash)   # or one you keep
    >>> standing = stand(wb)                    # follows every call and refreshes between them
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from .compat import ipyparallel as ipp_compat
from .engine import state as engine_state
from .protocol import TELEMETRY_LATEST, TELEMETRY_START

REFRESH_S = 0.25  # view refreshes: four a second while a call runs
RATE_WINDOW_S = 1.0  # tokens/s is measured over the last second of snapshots
TEXT_EVERY_S = 5.0  # the text view prints a line per engine at most this often
HISTORY = 240  # points of the throughput plot (a minute at four a second)

log = logging.getLogger("mpbook.dashboard")


def in_notebook() -> bool:
    """True in a Jupyter kernel (widgets can render), False in a terminal or script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and getattr(shell, "kernel", None) is not None


def format_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def format_rate(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r / 1000:.1f}k" if r >= 10_000 else f"{r:.1f}"


def total_tokens(snapshot: Mapping[str, Any]) -> int:
    return sum(snapshot.get("tokens", {}).values())


# --------------------------------------------------------------------------- the figures
@dataclass
class RankTrack:
    """What the dashboard knows of one rank: its snapshots, as running totals."""

    rank: int
    host: str = ""
    device: str = ""
    latest: dict[str, Any] | None = None
    call_start: dict[str, Any] | None = None  # the snapshot as the current/last call began
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # (engine time, tokens, collective s)
    outcome: str = ""  # "", "failed"
    received: float = 0.0  # time.monotonic() on the client when the latest snapshot came in

    def add(self, snapshot: Mapping[str, Any], *, start: Mapping[str, Any] | None = None) -> None:
        if start is not None and (self.call_start is None or start["time"] > self.call_start["time"]):
            self.call_start = dict(start)
        if self.latest is not None and snapshot["time"] <= self.latest["time"]:
            return  # seen already (the same totals reread on the next tick)
        self.latest = dict(snapshot)
        self.received = time.monotonic()
        self.host = snapshot.get("host", self.host)
        self.device = snapshot.get("device", self.device)
        t = snapshot["time"]
        self.recent.append((t, total_tokens(snapshot), snapshot.get("collective_seconds", 0.0)))
        while len(self.recent) > 2 and t - self.recent[1][0] >= RATE_WINDOW_S:
            self.recent.popleft()

    def rate(self) -> float:
        """Tokens/s over the last second of snapshots (0 once the rank has gone quiet).

        Rates use the engine's own clock (differences only); staleness uses the client's,
        as engine clocks on other hosts need not agree with it.
        """
        if len(self.recent) < 2 or time.monotonic() - self.received > 2 * RATE_WINDOW_S:
            return 0.0
        (t0, n0, _), (t1, n1, _) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def collective_share(self) -> float:
        """Fraction of the last second of snapshots spent in collectives."""
        if len(self.recent) < 2:
            return 0.0
        (t0, _, c0), (t1, _, c1) = self.recent[0], self.recent[-1]
        return min(1.0, max(0.0, (c1 - c0) / (t1 - t0))) if t1 > t0 else 0.0

    def call_totals(self) -> tuple[dict[str, int], float]:
        """Tokens per phase and seconds of the current/last call, from its start snapshot."""
        if self.latest is None:
            return {}, 0.0
        start = self.call_start or self.latest
        before = start.get("tokens", {})
        tokens = {k: v - before.get(k, 0) for k, v in self.latest.get("tokens", {}).items() if v - before.get(k, 0)}
        return tokens, max(0.0, self.latest["time"] - start["time"])


@dataclass(frozen=True)
class Row:
    """One engine's row, as text."""

    rank: str
    host: str
    device: str
    memory: str
    peak: str
    phase: str
    tokens_per_s: str
    collectives: str
    reserved: str = "–"
    gpu: str = "–"


COLUMNS = ("rank", "host", "device", "memory", "peak", "phase", "tokens/s", "collectives")
CUDA_COLUMNS = ("reserved", "GPU used / total")


def row_of(track: RankTrack, *, finished: bool) -> Row:
    snap = track.latest
    if snap is None:
        return Row(str(track.rank), track.host, track.device, "–", "–", track.outcome or "waiting", "–", "–")
    memory = snap.get("memory") or {}
    if finished:
        tokens, seconds = track.call_totals()
        rate = sum(tokens.values()) / seconds if seconds > 0 else 0.0
    else:
        rate = track.rate()
    coll = snap.get("collective_seconds", 0.0)
    share = track.collective_share()
    gpu = "–"
    if memory.get("device_total"):
        gpu = f"{format_bytes(memory.get('device_used'))} / {format_bytes(memory['device_total'])}"
    return Row(
        rank=str(track.rank),
        host=track.host,
        device=track.device,
        memory=format_bytes(memory.get("in_use", snap.get("memory_in_use_bytes"))),
        peak=format_bytes(memory.get("peak", snap.get("peak_memory_bytes"))),
        phase=track.outcome or snap.get("phase", "?"),
        tokens_per_s=format_rate(rate),
        collectives=f"{coll:.2f} s" + (f" ({share:.0%})" if share >= 0.005 and not finished else ""),
        reserved=format_bytes(memory.get("reserved")),
        gpu=gpu,
    )


# --------------------------------------------------------------------------- views
PHASE_COLOURS = {
    "idle": "#777777",
    "loading": "#b8860b",
    "prefill": "#1f77b4",
    "decode": "#2ca02c",
    "failed": "#d62728",
    "waiting": "#777777",
}


def sparkline_svg(values: Sequence[float], *, width: int = 360, height: int = 56, label: str = "tokens/s") -> str:
    """A small line plot as inline SVG: cheap to rebuild four times a second."""
    top = max(values, default=0.0) or 1.0
    pad = 14
    if len(values) >= 2:
        step = width / (len(values) - 1)
        points = " ".join(f"{i * step:.1f},{pad + (height - pad) * (1 - v / top):.1f}" for i, v in enumerate(values))
        line = f'<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="{points}"/>'
    else:
        line = ""
    now = values[-1] if values else 0.0
    return (
        f'<svg width="{width}" height="{height + 2}" xmlns="http://www.w3.org/2000/svg" '
        f'style="font: 11px sans-serif; background: #fafafa">'
        f'<text x="2" y="11" fill="#444">{label}: {format_rate(now)} now, {format_rate(top if values else 0)} max</text>'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#ccc"/>{line}</svg>'
    )


class WidgetView:
    """ipywidgets: built once; refreshes only assign new values (an unchanged value sends nothing)."""

    def __init__(self, ranks: Sequence[int], *, cuda: bool):
        import ipywidgets as w

        self.columns = COLUMNS + (CUDA_COLUMNS if cuda else ())
        self.status = w.HTML()
        header = [w.HTML(f"<b>{name}</b>") for name in self.columns]
        self.cells: dict[int, dict[str, Any]] = {r: {c: w.Label() for c in self.columns} for r in ranks}
        grid = w.GridBox(
            children=header + [cell for r in ranks for cell in self.cells[r].values()],
            layout=w.Layout(grid_template_columns=f"repeat({len(self.columns)}, max-content)", grid_gap="0 18px"),
        )
        self.plot = w.HTML()
        self.widget = w.VBox([self.status, grid, self.plot])
        # CSS classes name the parts in the page, for styling and for tools that read it
        # (the browser test): .mpbook-dashboard, .mpbook-status, .mpbook-rank-0.mpbook-col-tokens-s ...
        self.widget.add_class("mpbook-dashboard")
        self.status.add_class("mpbook-status")
        grid.add_class("mpbook-grid")
        self.plot.add_class("mpbook-throughput")
        for r, cells in self.cells.items():
            for name, label in cells.items():
                label.add_class(f"mpbook-rank-{r}")
                label.add_class(f"mpbook-col-{css_name(name)}")

    def show(self) -> None:
        # Elsewhere (a script driving widgets, a test) display() would print the widget's repr.
        if in_notebook():
            from IPython.display import display

            display(self.widget)

    def render(self, status: str, rows: Sequence[Row], history: Sequence[float]) -> None:
        # The status goes last: each value is its own message to the front end, applied in
        # order, so once it says "done" the rows above it already show the final figures.
        for row in rows:
            cells = self.cells.get(int(row.rank))
            if cells is None:
                continue
            values = (*row_values(row), row.reserved, row.gpu)
            for name, value in zip(self.columns, values):
                cells[name].value = value
            cells["phase"].style.text_color = PHASE_COLOURS.get(row.phase, "#000000")
        self.plot.value = sparkline_svg(list(history))
        self.status.value = status

    def values(self) -> dict[int, dict[str, str]]:
        """What the grid shows now, rank -> column -> text (for tests and tools)."""
        return {r: {c: lab.value for c, lab in cells.items()} for r, cells in self.cells.items()}


def css_name(column: str) -> str:
    """A column's name as a CSS class suffix: "tokens/s" -> "tokens-s"."""
    return "-".join("".join(c if c.isalnum() else " " for c in column.lower()).split())


def row_values(row: Row) -> tuple[str, ...]:
    return (row.rank, row.host, row.device, row.memory, row.peak, row.phase, row.tokens_per_s, row.collectives)


class TextView:
    """Plain text: a line per engine at most every ``every_s``, and a summary at the end."""

    def __init__(self, *, out: TextIO | None = None, every_s: float | None = None):
        self.out = out
        self.every_s = TEXT_EVERY_S if every_s is None else every_s
        self._last_print = 0.0
        self.printed_rows = False

    def _write(self, text: str) -> None:
        out = self.out or sys.stdout  # looked up late: pytest and IPython swap sys.stdout
        out.write(text)
        out.flush()

    def show(self) -> None:
        self._last_print = time.monotonic()

    def render(self, status: str, rows: Sequence[Row], history: Sequence[float], *, elapsed: float) -> None:
        if time.monotonic() - self._last_print < self.every_s:
            return
        self._last_print = time.monotonic()
        self.printed_rows = True
        lines = [
            f"[mpbook {elapsed:5.1f} s] rank {r.rank} {r.device:<6} {r.phase:<8} mem {r.memory} (peak {r.peak})  "
            f"{r.tokens_per_s} tok/s  collectives {r.collectives}"
            for r in rows
        ]
        if len(rows) > 1 and history:
            lines.append(f"[mpbook {elapsed:5.1f} s] all ranks {format_rate(history[-1])} tok/s")
        self._write("\n".join(lines) + "\n")

    def summary(self, headline: str, rows: Sequence[Row]) -> None:
        lines = [f"mpbook: {headline}"]
        lines += [
            f"  rank {r.rank} {r.device:<6} {r.phase:<8} peak {r.peak}  {r.tokens_per_s} tok/s  collectives {r.collectives}"
            for r in rows
        ]
        self._write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the dashboard
class Dashboard:
    """Per-engine memory, phase, tokens/s and collective time, live.

    ``mode``: "widget", "text", or "auto" (widgets in a notebook, text elsewhere).
    ``ranks``: the rows (default: every rank of ``workbench``). ``cuda``: add the columns of
    torch's reserved memory and the GPU's use (default: when the workbench runs on GPUs).
    """

    def __init__(
        self,
        workbench=None,
        *,
        ranks: Sequence[int] | None = None,
        cuda: bool | None = None,
        mode: str = "auto",
        refresh_s: float = REFRESH_S,
        text_every_s: float | None = None,
        out: TextIO | None = None,
    ):
        if mode not in ("auto", "widget", "text"):
            raise ValueError(f"mode={mode!r}: use 'auto', 'widget' or 'text'")
        if ranks is None:
            if workbench is None:
                raise ValueError("Dashboard needs a workbench or the list of ranks to show")
            ranks = workbench.ranks
        self.ranks = list(ranks)
        if cuda is None:
            cuda = workbench is not None and workbench.device_type == "cuda"
        self.mode = ("widget" if in_notebook() else "text") if mode == "auto" else mode
        self.refresh_s = refresh_s
        self.tracks = {r: RankTrack(r) for r in self.ranks}
        for info in getattr(workbench, "engines", None) or []:
            if info.rank in self.tracks:
                self.tracks[info.rank].host, self.tracks[info.rank].device = info.host, info.device
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.refreshes = 0  # view refreshes so far (tests and the benchmark read it)
        self.state = "ready"  # ready, running, done, failed, interrupted, idle, stopped
        self.headline = "ready"
        self.outcome = ""  # how the last call ended, kept while a standing dashboard idles
        self._began = time.monotonic()
        self._last_refresh = 0.0
        self._shown = False
        if self.mode == "widget":
            self.view: WidgetView | TextView = WidgetView(self.ranks, cuda=cuda)
        else:
            self.view = TextView(out=out, every_s=text_every_s)

    @property
    def widget(self):
        """The ipywidgets box (widget mode), e.g. to place it in a layout of your own."""
        return getattr(self.view, "widget", None)

    def show(self) -> Dashboard:
        if not self._shown:
            self._shown = True
            self.view.show()
            self.refresh(force=True)
        return self

    def _repr_mimebundle_(self, **kwargs):
        # A dashboard as the last expression of a cell shows as its widget.
        widget = self.widget
        if widget is not None:
            self._shown = True
            return widget._repr_mimebundle_(**kwargs)
        return {"text/plain": repr(self)}

    # ----------------------------------------------------------------- feeding
    def begin(self, ranks: Sequence[int] | None = None) -> None:
        """A call starts on ``ranks``."""
        self.state, self._began = "running", time.monotonic()
        for r in ranks or self.ranks:
            if r in self.tracks:
                self.tracks[r].outcome = ""
                self.tracks[r].call_start = None
        self.refresh(force=True)

    def update(self, snapshots: Mapping[int, Mapping[str, Any]], starts: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        """Take the latest snapshot of some ranks (and the snapshots their calls began with)."""
        for rank, snap in snapshots.items():
            track = self.tracks.get(rank)
            if track is not None and snap:
                track.add(snap, start=(starts or {}).get(rank))

    def update_from(self, result, ranks: Sequence[int]) -> None:
        """Read what the engines published to ``result`` (an AsyncResult, one target per rank)."""
        # one metadata dict per target, filled in by the client's IO thread
        latest, starts = {}, {}
        for rank, md in zip(ranks, ipp_compat.target_metadata(result)):
            data = md.get("data") or {}
            if TELEMETRY_LATEST in data:
                latest[rank] = data[TELEMETRY_LATEST]
            if TELEMETRY_START in data:
                starts[rank] = data[TELEMETRY_START]
        self.update(latest, starts)

    def aggregate_rate(self) -> float:
        """Tokens/s of the cluster: ranks of one replica work on the same tokens, so each
        replica counts once (its fastest rank); replicas add up."""
        best: dict[Any, float] = {}
        for track in self.tracks.values():
            if track.latest is not None:
                replica = track.latest.get("replica", track.rank)
                best[replica] = max(best.get(replica, 0.0), track.rate())
        return sum(best.values())

    def call_tokens(self) -> tuple[dict[str, int], float]:
        """Tokens per phase of the current/last call, each replica counted once (its rank
        with the most tokens), and the longest rank's seconds."""
        per_replica: dict[Any, dict[str, int]] = {}
        seconds = 0.0
        for track in self.tracks.values():
            if track.latest is None:
                continue
            tokens, spent = track.call_totals()
            seconds = max(seconds, spent)
            replica = track.latest.get("replica", track.rank)
            if sum(tokens.values()) > sum(per_replica.get(replica, {}).values()):
                per_replica[replica] = tokens
        total: dict[str, int] = {}
        for tokens in per_replica.values():
            for phase, n in tokens.items():
                total[phase] = total.get(phase, 0) + n
        return total, seconds

    def refresh(self, *, force: bool = False) -> None:
        mono = time.monotonic()
        if not force and mono - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = mono
        finished = self.state in ("done", "failed", "interrupted")
        if not finished:
            self.history.append(self.aggregate_rate())
        elapsed = mono - self._began
        if self.state == "running":
            self.headline = f"running · {elapsed:.1f} s"
        rows = [row_of(self.tracks[r], finished=finished) for r in self.ranks]
        self.refreshes += 1
        if isinstance(self.view, WidgetView):
            self.view.render(self._status_html(), rows, self.history)
        elif self.state == "running":
            self.view.render(self.headline, rows, self.history, elapsed=elapsed)

    def idle(self, note: str) -> None:
        """Between calls (a standing dashboard): live rows, the last outcome kept in view."""
        if self.state != "running":
            self.state = "idle"
            self.headline = note + (f" · last call {self.outcome}" if self.outcome else "")

    def _status_html(self) -> str:
        mark = {"running": "●", "done": "✓", "failed": "✗", "interrupted": "■", "stopped": "■"}.get(self.state, "·")
        colour = {"done": "#2ca02c", "failed": "#d62728", "running": "#1f77b4"}.get(self.state, "#555555")
        from html import escape

        return f'<span style="color:{colour}"><b>{mark}</b></span> mpbook: {escape(self.headline)}'

    def finish(self, error: BaseException | None = None) -> None:
        """The call is over: show success, or which rank failed."""
        seconds = time.monotonic() - self._began
        tokens, busy_seconds = self.call_tokens()
        failed_ranks = list(getattr(error, "ranks", []) or [])
        if isinstance(error, KeyboardInterrupt):
            self.state, self.headline = "interrupted", f"interrupted after {seconds:.1f} s"
        elif error is not None:
            self.state = "failed"
            for r in failed_ranks:
                if r in self.tracks:
                    self.tracks[r].outcome = "failed"
            where = f"on rank{'s' if len(failed_ranks) > 1 else ''} {', '.join(map(str, failed_ranks))}" if failed_ranks else ""
            first = error.failures[0] if getattr(error, "failures", None) else None
            cause = f"{first.ename}: {first.evalue}" if first else f"{type(error).__name__}: {error}"
            self.headline = f"failed {where} after {seconds:.1f} s: {cause}".replace("  ", " ")
        else:
            self.state = "done"
            self.headline = f"done in {seconds:.1f} s" + _tokens_phrase(tokens, busy_seconds)
        self.outcome = self.headline
        self.refresh(force=True)
        if isinstance(self.view, TextView) and (self.view.printed_rows or sum(tokens.values())):
            rows = [row_of(self.tracks[r], finished=True) for r in self.ranks]
            self.view.summary(self.headline, rows)

    def tick(self, result, ranks: Sequence[int]) -> None:
        """One tick of the wait loop on ``result``: read the engines' snapshots, maybe redraw."""
        self.update_from(result, ranks)
        self.refresh()


def _tokens_phrase(tokens: Mapping[str, int], seconds: float) -> str:
    total = sum(tokens.values())
    if not total:
        return ""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(tokens.items()))
    rate = f" · {format_rate(total / seconds)} tok/s" if seconds > 0 else ""
    return f" · {total} tokens ({parts}){rate}"


@contextmanager
def follow(dashboards: Sequence[Dashboard], result, ranks: Sequence[int], *, on_tick=None) -> Iterator[Callable[[], None]]:
    """What a call to the engines waits under: ``dashboards`` follow ``result``; yields the
    wait loop's tick.

    A display problem must not cost the user their call: a dashboard that raises is logged
    once and left alone for the rest of the call.
    """
    alive = list(dashboards)

    def each(action: Callable[[Dashboard], None]) -> None:
        for d in list(alive):
            try:
                action(d)
            except Exception:
                alive.remove(d)
                log.warning("the mpbook dashboard stopped updating", exc_info=True)

    each(lambda d: (d.show(), d.begin(ranks)))

    def tick() -> None:
        each(lambda d: d.tick(result, ranks))
        if on_tick is not None:
            on_tick()

    try:
        yield tick
    except BaseException as exc:
        each(lambda d: (d.update_from(result, ranks), d.finish(exc)))
        raise
    each(lambda d: (d.update_from(result, ranks), d.finish()))


# --------------------------------------------------------------------------- standing
class Standing:
    """A dashboard that stays: it follows every call of the workbench and, between calls,
    asks the idle engines for a snapshot every ``period_s`` from an asyncio task on the
    kernel's event loop (so it never blocks the kernel: each await gives the loop back)."""

    def __init__(self, workbench, dashboard: Dashboard, *, period_s: float = 1.0, timeout_s: float = 5.0):
        self.workbench = workbench
        self.dashboard = dashboard
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.polls = 0  # snapshots taken between calls (tests read it)
        self._task: asyncio.Task | None = None
        self._stopped = False

    def start(self) -> Standing:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or isinstance(self.dashboard.view, TextView):
            # A terminal or script runs no event loop between commands, and the text view
            # already prints during calls: show the engines' state once.
            self.poll_once()
            return self
        self.workbench.follow_always(self.dashboard)
        self.dashboard.show()
        self._task = loop.create_task(self._run())
        return self

    @property
    def running(self) -> bool:
        # A cancelled task ends at the loop's next turn; stopped already means no more polls.
        return self._task is not None and not self._task.done() and not self._stopped

    def poll_once(self, timeout_s: float | None = None) -> None:
        """Take one snapshot of every engine now (blocking; for terminals and scripts)."""
        wb = self.workbench
        result = wb.client[wb.engine_ids()].apply_async(engine_state.telemetry_snapshot)
        result.wait(timeout_s or self.timeout_s)
        self._take(result)
        if isinstance(self.dashboard.view, TextView):
            rows = [row_of(self.dashboard.tracks[r], finished=False) for r in self.dashboard.ranks]
            self.dashboard.view.summary("the engines now (a standing dashboard that refreshes needs a notebook)", rows)
        else:
            self.dashboard.show()

    def _take(self, result) -> None:
        if not result.ready():
            return
        values = result.get(return_exceptions=True)
        snaps = {r: v for r, v in zip(self.workbench.ranks, values) if isinstance(v, dict)}
        self.dashboard.update(snaps)
        self.polls += 1
        self.dashboard.idle(f"engines idle · refreshing every {self.period_s:g} s")
        self.dashboard.refresh(force=True)

    async def _run(self) -> None:
        wb = self.workbench
        try:
            while not wb.stopped and not self._stopped:
                result = wb.client[wb.engine_ids()].apply_async(engine_state.telemetry_snapshot)
                deadline = time.monotonic() + self.timeout_s
                # Poll rather than block: the kernel keeps serving cells and comms meanwhile.
                while not result.ready() and time.monotonic() < deadline and not wb.stopped:
                    await asyncio.sleep(0.02)
                self._take(result)
                await asyncio.sleep(self.period_s)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # never let a refresh error escape into the kernel
            log.debug("standing dashboard stopped", exc_info=True)
            self.dashboard.headline = f"stopped refreshing: {type(exc).__name__}: {exc}"
        finally:
            self._end()

    def _end(self) -> None:
        self.workbench.unfollow(self.dashboard)
        if self.dashboard.state == "stopped":
            return
        self.dashboard.state = "stopped"
        why = "the cluster stopped" if self.workbench.stopped else "stopped refreshing"
        if not self.dashboard.headline.startswith("stopped refreshing:"):
            self.dashboard.headline = why + (f" · last call {self.dashboard.outcome}" if self.dashboard.outcome else "")
        self.dashboard.refresh(force=True)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._end()


def stand(workbench, *, period_s: float = 1.0, mode: str = "auto") -> Standing:
    """Show a dashboard that follows every call and refreshes between them."""
    return Standing(workbench, Dashboard(workbench, mode=mode), period_s=period_s).start()
