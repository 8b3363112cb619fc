"""The dashboard's sentences: the status line and the throughput plot's label.

Both views show the same words. A finished call's line names the call's own time (loading
included), each phase's tokens and tokens/s, and its time in collectives; once the run's
result is known (:meth:`Dashboard.show_result`) its numbers replace the snapshots' own, so the
dashboard and the summary line printed under it agree digit for digit, and the line's parts
(preparing, importing, loading, compiling, prefill, decode, client & transfer) add up to the call's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .snapshots import CellFigures, format_phase_rate, format_rate

MIN_POINTS = 4  # fewer points than this with tokens in them: the plot's label gives the cell's rate


def duration(seconds: float) -> str:
    """A call's time as a person reads it: ``"35 ms"`` under a second (a quick `%%mp run` cell
    is not "0.0 s"), ``"4.2 s"`` from there on."""
    return f"{seconds * 1000:.0f} ms" if seconds < 0.9995 else f"{seconds:.1f} s"


def preparing(elapsed: float, note: str) -> str:
    """``"preparing · 0.4 s · resolving the model tiny"``: what the client does before it calls
    the engines (a kernel's first model takes seconds), shown from the start of the call."""
    return f"preparing · {elapsed:.1f} s · {note}"


def running(elapsed: float, phases: Sequence[str]) -> str:
    """``"running · 4.2 s · importing"``: the ranks' phases, each named once, in run order."""
    working = [p for p in ("importing", "loading", "compiling", "prefill", "decode") if p in phases]
    return f"running · {elapsed:.1f} s" + (f" · {'/'.join(working)}" if working else "")


def _story(seconds: float, loading_s: float, phases: Sequence[tuple[str, int, float | None]],
           collectives_s: float, importing_s: float = 0.0) -> str:
    parts = [f"done in {duration(seconds)}"]
    if importing_s >= 0.05:
        parts.append(f"importing {importing_s:.1f} s")
    if loading_s >= 0.05:
        parts.append(f"loading {loading_s:.1f} s")
    for phase, tokens, rate in phases:
        if tokens:
            per_s = f", {format_phase_rate(phase, rate)} tok/s" if rate else ""
            parts.append(f"{phase} {tokens:,} token{'s' if tokens != 1 else ''}{per_s}")
    if collectives_s >= 0.005:
        parts.append(f"collectives up to {collectives_s:.2f} s a rank")
    return " · ".join(parts)


def done(seconds: float, figures: CellFigures) -> str:
    """A finished call, from the snapshots."""
    phases = [(p, figures.tokens.get(p, 0), figures.rate(p)) for p in ("prefill", "decode")]
    return _story(seconds, figures.phase_seconds.get("loading", 0.0), phases,
                  max(figures.collective_seconds.values(), default=0.0), figures.phase_seconds.get("importing", 0.0))


def done_with_result(seconds: float, result: Any) -> str:
    """A finished run, in its result's numbers (:class:`mpbook.results.RunResult`): the call's
    time and the parts it went to, which add up to it (:meth:`~mpbook.results.RunResult.cell_parts`:
    preparing, importing, loading, prefill, decode, and the rest as ``client & transfer``;
    a part under 0.05 s is left out)."""
    prefill_tokens = sum(result.prompt_tokens)
    # as the result counts them: each prompt's first new token comes out of the prefill
    decode_tokens = sum(max(len(ids) - 1, 0) for ids in result.token_ids) if result.max_new_tokens else 0
    rates = {"prefill": (prefill_tokens, result.prefill_tokens_per_s), "decode": (decode_tokens, result.decode_tokens_per_s)}
    parts = [f"done in {duration(seconds)}"]
    for name, spent in result.cell_parts():
        if name in rates:
            tokens, rate = rates[name]
            if tokens:
                per_s = f", {format_phase_rate(name, rate)} tok/s" if rate else ""
                parts.append(f"{name} {tokens:,} token{'s' if tokens != 1 else ''}{per_s} in {duration(spent)}")
        elif spent >= 0.05:
            parts.append(f"{name} {spent:.1f} s")
    collectives_s = max(result.collective_seconds or [0.0])
    if collectives_s >= 0.005:
        parts.append(f"collectives up to {collectives_s:.2f} s a rank")
    return " · ".join(parts)


def failed(seconds: float, error: BaseException) -> str:
    ranks = list(getattr(error, "ranks", []) or [])
    where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    first = error.failures[0] if getattr(error, "failures", None) else None
    cause = f"{first.ename}: {first.evalue}" if first else f"{type(error).__name__}: {error}"
    return f"failed{where} after {duration(seconds)}: {cause}"


def interrupted(seconds: float) -> str:
    return f"interrupted after {duration(seconds)}"


def rate_label(history: Sequence[float], figures: CellFigures, *, live: bool, result: Any = None) -> str:
    """What the throughput plot's numbers are.

    Never a made-up maximum: with too few points the label gives the cell's own rate so far,
    and a finished call's label gives its rates per phase (the result's, once known).
    """
    if result is not None:
        rates = [("prefill", result.prefill_tokens_per_s), ("decode", result.decode_tokens_per_s)]
    else:
        rates = [(p, figures.rate(p)) for p in ("prefill", "decode")]
    cell = " · ".join(f"{p} {format_phase_rate(p, r)} tok/s" for p, r in rates if r)
    points = [v for v in history if v > 0]
    if live and len(points) >= MIN_POINTS:
        return f"tokens/s: {format_rate(history[-1])} now · {format_rate(max(points))} max"
    if cell:
        return f"this cell: {cell}" if not live else f"tokens/s so far this cell: {cell}"
    return "tokens/s: no tokens yet" if live else "tokens/s: no tokens in this call"
