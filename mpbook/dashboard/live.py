"""The dashboard: per-engine figures of the call that runs, fed by the engines' snapshots.

The wait loop of a call (:mod:`mpbook.cluster.calls`) ticks about twenty times a second; each
tick reads what the engines published and, at most every ``refresh_s``, hands the view a new
:class:`~mpbook.dashboard.view.Frame`. Every figure belongs to the call (one cell): its
tokens, phases (loading included), collectives and time start from zero when it begins.

A strategy run also tells the dashboard what it is about as it starts (``begin(run=...)``:
prompts, a decoder for their new tokens) and what came of it (:meth:`Dashboard.show_result`),
so the prompts' texts grow while it runs and the final line carries the result's numbers.

    >>> wb.run(code, dashboard=True)            # a dashboard for this call
    >>> dash = Dashboard(wb); wb.apply(fn, dashboard=dash)   # or one you keep
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from ..compat import ipyparallel as ipp_compat
from ..protocol import TELEMETRY_LATEST, TELEMETRY_START
from . import words
from .snapshots import RankTrack, cell_figures, live_rate, replica_rates, result_rates, row_of
from .text_view import TextView
from .texts import PromptTexts, call_stream
from .view import Frame, View
from .widget import WidgetView, in_notebook

REFRESH_S = 0.25  # view refreshes: four a second while a call runs
HISTORY = 240  # points of the throughput plot (a minute at four a second)
FINISHED = ("done", "failed", "interrupted")


class Dashboard:
    """Per-engine phase, tokens/s, collectives and memory of the running call, live.

    ``mode``: "widget", "text", or "auto" (widgets in a notebook, text elsewhere).
    ``ranks``: the rows (default: every rank of ``workbench``). ``cuda``: add the columns of
    torch's reserved memory and the GPU's use (default: when the workbench runs on GPUs).
    ``clock``: the client's clock (tests pass their own).
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
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in ("auto", "widget", "text"):
            raise ValueError(f"mode={mode!r}: use 'auto', 'widget' or 'text'")
        if ranks is None:
            if workbench is None:
                raise ValueError("Dashboard needs a workbench or the list of ranks to show: Dashboard(wb) or Dashboard(ranks=[0, 1])")
            ranks = workbench.ranks
        self.ranks = list(ranks)
        if cuda is None:
            cuda = workbench is not None and workbench.device_type == "cuda"
        self.mode = ("widget" if in_notebook() else "text") if mode == "auto" else mode
        self.refresh_s = refresh_s
        self.clock = clock
        self.tracks = {r: RankTrack(r) for r in self.ranks}
        for info in getattr(workbench, "engines", None) or []:
            if info.rank in self.tracks:
                self.tracks[info.rank].host, self.tracks[info.rank].device = info.host, info.device
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.refreshes = 0  # view refreshes so far (tests and the benchmark read it)
        self.calls = 0  # calls followed so far
        self.state = "ready"
        self.headline = "ready"
        self.outcome = ""  # how the last call ended, kept in view while a standing dashboard idles
        self.texts = PromptTexts()  # the current call's prompts and their texts so far
        self.result: Any = None  # the last run's result, once shown
        self._awaits_result = False  # the end state waits for show_result (text: one summary)
        self.client_step: str | None = None  # what the client does before it calls the engines (preparing)
        self._began = clock()
        self._last_refresh = -float("inf")
        self._shown = False
        hosts = {r: track.host for r, track in self.tracks.items()}
        self.view: View = (WidgetView(self.ranks, cuda=cuda, hosts=hosts) if self.mode == "widget"
                           else TextView(out=out, every_s=text_every_s))

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

    def __repr__(self) -> str:
        return f"<Dashboard {self.mode}, ranks {self.ranks}: {self.headline}>"

    # ----------------------------------------------------------------- a run's story
    def begin(self, ranks: Sequence[int] | None = None, *, run: Any = None) -> None:
        """A call starts on ``ranks``: every figure starts from zero.

        ``run``: what a strategy run is about (its follower was told before dispatch): it
        has ``prompts`` (list of str) and ``decode`` (token ids -> str, or None), so that
        each prompt's text grows in view; the end state then waits for :meth:`show_result`.
        """
        if self.client_step is None:  # else the call began with its preparation (preparing)
            self._began = self.clock()
            self.calls += 1
        self.client_step = None
        self.texts = PromptTexts(list(getattr(run, "prompts", None) or []), getattr(run, "decode", None))
        self._awaits_result = run is not None
        self.result = None
        self.state = "running"
        self.history.clear()
        for r in ranks or self.ranks:
            if r in self.tracks:
                self.tracks[r].begin()
        self.refresh(force=True)

    def preparing(self, note: str) -> None:
        """Before the call reaches the engines, the client's own step ``note`` (resolving the
        model, tokenizing, checking): the call begins with the first one, so that the dashboard
        is on screen at once and its time counts from there."""
        if self.client_step is None:
            self._began = self.clock()
            self.calls += 1
            self.texts = PromptTexts()
            self._awaits_result = False
            self.result = None
            self.state = "running"
            self.history.clear()
            for track in self.tracks.values():
                track.begin()
        self.client_step = note
        self.refresh(force=True)

    def show_result(self, result: Any) -> None:
        """The run's merged result (:class:`mpbook.results.RunResult`): the end state shows its
        numbers (tokens/s per phase, loading, collectives) and its texts."""
        self.result = result
        self._awaits_result = False
        if self.state == "done":
            # the session's own time for the whole call (its client work included), if it says
            seconds = getattr(result, "cell_seconds", 0.0) or self._seconds
            self.headline = words.done_with_result(seconds, result)
            self.outcome = self.headline
        texts = list(getattr(result, "texts", None) or [])
        if texts:
            self.texts.settle(texts, getattr(result, "token_ids", None), getattr(result, "token_times", None))
        self.refreshes += 1
        self.view.finish(self.frame())

    # ----------------------------------------------------------------- feeding
    def update(self, snapshots: Mapping[int, Mapping[str, Any]], starts: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        """Take the latest snapshot of some ranks (and the snapshots their calls began with)."""
        now = self.clock()
        for rank, snap in snapshots.items():
            track = self.tracks.get(rank)
            if track is not None and snap:
                track.add(snap, start=(starts or {}).get(rank), now=now)
        if self.state == "running":
            for track in self.tracks.values():
                stream = call_stream(track.start, track.latest)
                if stream is not None:
                    self.texts.take(stream)

    def update_from(self, result, ranks: Sequence[int]) -> None:
        """Read what the engines published to ``result`` (an AsyncResult, one target per rank)."""
        latest, starts = {}, {}
        for rank, md in zip(ranks, ipp_compat.target_metadata(result)):
            data = md.get("data") or {}
            if TELEMETRY_LATEST in data:
                latest[rank] = data[TELEMETRY_LATEST]
            if TELEMETRY_START in data:
                starts[rank] = data[TELEMETRY_START]
        self.update(latest, starts)

    def tick(self, result, ranks: Sequence[int]) -> None:
        """One tick of the wait loop on ``result``: read the engines' snapshots, maybe redraw."""
        self.update_from(result, ranks)
        self.refresh()

    # ----------------------------------------------------------------- figures
    def aggregate_rate(self) -> float:
        """The cluster's tokens/s now (each replica once)."""
        return live_rate(self.tracks.values(), self.clock())

    @property
    def _seconds(self) -> float:
        return self.clock() - self._began

    def frame(self) -> Frame:
        """What the view shows now."""
        now = self.clock()
        finished = self.state in FINISHED
        running = self.state == "running"
        tracks = [self.tracks[r] for r in self.ranks]
        figures = cell_figures(tracks)
        result = self.result if not running else None
        if running or not self.calls:
            rates = {t.rank: t.rate(now) for t in tracks}
        elif result is not None:  # merged: the result's figures, every one of them
            rates = result_rates(result)
        else:  # a call is over: each rank shows its replica's tokens/s over that call
            phase = figures.main_phase
            per_replica = replica_rates(tracks, phase) if phase else {}
            rates = {t.rank: per_replica.get(t.replica) for t in tracks}
        rows = tuple(row_of(t, rate=rates.get(t.rank), live=running, result=result) for t in tracks)
        # A throughput plot only where there are tokens to plot (a `%%mp run` cell of plain
        # code has none): a generation from its start, another call once tokens come.
        tokens = bool(self.texts.prompts) or result is not None or figures.total_tokens > 0 or any(self.history)
        return Frame(
            call=self.calls,
            state=self.state,
            headline=self.headline,
            rows=rows,
            history=tuple(self.history),
            rate_label=words.rate_label(self.history, figures, live=running, result=self.result),
            prompts=tuple(self.texts.lines()),
            elapsed=now - self._began,
            quiet=finished and not figures.total_tokens and self.result is None,
            tokens=tokens,
        )

    def refresh(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = now
        if self.state == "running" and self.client_step is not None:
            self.headline = words.preparing(now - self._began, self.client_step)
        elif self.state == "running":
            self.history.append(self.aggregate_rate())
            phases = [t.latest.get("phase", "") for t in self.tracks.values() if t.latest is not None]
            self.headline = words.running(now - self._began, phases)
        self.refreshes += 1
        self.view.render(self.frame())

    # ----------------------------------------------------------------- the end
    def finish(self, error: BaseException | None = None) -> None:
        """The call is over: show success, or which rank failed (or, before the call reached
        the engines, what stopped it)."""
        seconds = self._seconds
        self.client_step = None
        if isinstance(error, KeyboardInterrupt):
            self.state, self.headline = "interrupted", words.interrupted(seconds)
        elif error is not None:
            self.state = "failed"
            for r in getattr(error, "ranks", []) or []:
                if r in self.tracks:
                    self.tracks[r].outcome = "failed"
            self.headline = words.failed(seconds, error)
        else:
            self.state = "done"
            self.headline = words.done(seconds, cell_figures(self.tracks.values()))
        self.outcome = self.headline
        self.refreshes += 1
        frame = self.frame()
        if error is None and self._awaits_result:
            # show_result comes next with the run's own numbers: show these meanwhile, but
            # leave the end state (a text summary) to it, so that it is printed once.
            self.view.render(frame)
        else:
            self._awaits_result = False
            self.view.finish(frame)

    def idle(self, note: str) -> None:
        """Between calls (a standing dashboard): live rows, the last outcome kept in view."""
        if self.state != "running":
            self.state = "idle"
            self.headline = note + (f" · last call {self.outcome}" if self.outcome else "")

    def stopped(self, why: str) -> None:
        """No more calls or refreshes (a standing dashboard whose cluster stopped)."""
        self.state = "stopped"
        self.headline = why + (f" · last call {self.outcome}" if self.outcome else "")
        self.refresh(force=True)

    def report(self, note: str) -> None:
        """A one-off look at the engines (a standing dashboard where nothing refreshes)."""
        self.idle(note)
        self.refreshes += 1
        self.view.finish(self.frame())
