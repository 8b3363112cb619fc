"""A plan as a person reads it: the table, the arithmetic behind each number, the verdict,
the other layouts; as text or as HTML.

Reads a plan's fields only (nothing here computes a byte), so both views show the same numbers.
"""

from __future__ import annotations

import html
from typing import Any, Protocol

from ..layout import Layout
from ..units import format_bytes
from .ranks import RankMemory, layers_label
from .suggestions import Suggestion
from .workload import Workload


class MemoryPlan(Protocol):
    """The fields of :class:`mpbook.planner.memory_plan.MemoryPlan` shown here (named, not
    imported: the plan imports this module for its views)."""

    model: str
    architecture: str
    layout: Layout
    workload: Workload
    ranks: list[RankMemory]
    memory_source: str
    suggestions: list[Suggestion]
    speed: Any  # mpbook.planner.speed.SpeedPrediction or None

    @property
    def fits(self) -> bool: ...

    @property
    def peak_bytes(self) -> int: ...


COLUMNS = ("rank", "dp", "pp", "tp", "layers", "rows", "weights", "KV cache", "activations", "total", "free", "fits")
LEFT_ALIGNED = {COLUMNS.index("layers")}
FITS = {True: "yes", False: "NO", None: "?"}


def _plural(n: int, word: str) -> str:
    return f"{word}{'s' if n != 1 else ''}"


def header(p: MemoryPlan) -> str:
    w = p.workload
    tokens = f"{w.prompt_len} prompt" + (f" + {w.max_new_tokens} new tokens" if w.max_new_tokens else " tokens")
    mbs = f", {w.microbatches} micro-batches" if w.microbatches > 1 else ""
    return (
        f"mpbook.plan: {p.model} ({p.architecture}), {p.layout}, {w.dtype}, "
        f"{w.batch} {_plural(w.batch, 'prompt')} x {tokens}{mbs}, {w.attention} attention"
    )


def table_rows(p: MemoryPlan) -> list[tuple[str, ...]]:
    rows = [COLUMNS]
    for r in p.ranks:
        free = format_bytes(r.device.free_bytes) + ("*" if r.device.shared else "") if r.device else "-"
        rows.append((
            str(r.rank), str(r.dp), str(r.pp), str(r.tp), layers_label(r.layers).split(" ")[1], str(r.rows),
            format_bytes(r.weights), format_bytes(r.kv_cache), format_bytes(r.activations), format_bytes(r.total),
            free, FITS[r.fits],
        ))
    return rows


def arithmetic(p: MemoryPlan) -> list[str]:
    """How the numbers are made, once for each group of ranks that hold the same."""
    lines = []
    shown: set[tuple] = set()
    for r in p.ranks:
        sig = (r.pp, r.weights, r.kv_cache, r.activations)
        if sig in shown:
            continue
        shown.add(sig)
        same = [x.rank for x in p.ranks if (x.pp, x.weights, x.kv_cache, x.activations) == sig]
        lines.append(f"{_plural(len(same), 'rank')} {', '.join(map(str, same))} (stage {r.pp}, {layers_label(r.layers)}):")
        parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in r.weight_parts.items() if v or "tied" in k)
        lines.append(f"  weights     = {parts} = {format_bytes(r.weights)}")
        lines.append(f"  KV cache    = {r.kv_formula} = {format_bytes(r.kv_cache)}")
        if r.activation_parts:
            act = " + ".join(f"{k} {format_bytes(v)}" for k, v in r.activation_parts.items())
            what = "prefill" if r.activation_phase == "prefill" else "a decode step"
            lines.append(f"  activations = {what} of {r.microbatch_rows} {_plural(r.microbatch_rows, 'row')}: "
                         f"{act} = {format_bytes(r.activations)}")
        else:
            lines.append("  activations = none: this replica has no prompts")
        lines.append(f"  total       = {format_bytes(r.weights)} + {format_bytes(r.kv_cache)} + "
                     f"{format_bytes(r.activations)} = {format_bytes(r.total)}")
    return lines


def verdict(p: MemoryPlan) -> str:
    if p.fits:
        return f"Fits: at most {format_bytes(p.peak_bytes)} on a rank ({p.memory_source})."
    bad = [r for r in p.ranks if not r.fits]
    return f"Does NOT fit on {_plural(len(bad), 'rank')} {', '.join(str(r.rank) for r in bad)} ({p.memory_source})."


def notes(p: MemoryPlan) -> list[str]:
    out = ["Peak per rank = weights + KV cache + activations; activations are an estimate "
           "(see mpbook.plan's docstring), and the runtime (CUDA context, allocator slack) is not counted."]
    if any(r.device and r.device.shared for r in p.ranks):
        out.append("* CPU engines on one host share its memory: they fit together or not at all.")
    return out


def text(p: MemoryPlan) -> str:
    rows = table_rows(p)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    table = [
        "  ".join(cell.ljust(w) if i in LEFT_ALIGNED else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    out = [header(p), "", *table, "", *arithmetic(p), "", verdict(p), *notes(p)]
    if p.speed is not None:
        out += ["", "Speed: " + p.speed.words(), *(f"  {line}" for line in p.speed.arithmetic())]
    if p.suggestions:
        world = p.layout.world_size
        out += ["", f"Layouts over {world} {_plural(world, 'engine')}:", *(f"  {s}" for s in p.suggestions)]
    return "\n".join(out)


def html_view(p: MemoryPlan) -> str:
    esc = html.escape
    rows = table_rows(p)
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = ""
    for row, r in zip(rows[1:], p.ranks):
        style = "" if r.fits is not False else ' style="color:#b00020;font-weight:bold"'
        body += f"<tr{style}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
    sugg = ""
    if p.suggestions:
        items = "".join(
            f"<li><code>{esc(str(s.layout))}</code>: "
            f"{'fits' if s.fits else ('does not fit' if s.valid else 'invalid')}"
            f"{', ' + esc(format_bytes(s.peak_bytes)) + ' per rank at most' if s.peak_bytes else ''}"
            f" ({esc(s.reason)})</li>"
            for s in p.suggestions
        )
        sugg = f"<p>Layouts over {p.layout.world_size} engines:</p><ul>{items}</ul>"
    speed = p.speed
    speed_html = "" if speed is None else (
        f"<p><b>Speed</b>: {esc(speed.words())}</p><pre>{esc(chr(10).join(speed.arithmetic()))}</pre>")
    return (
        f"<div><p><b>{esc(header(p))}</b></p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<pre>{esc(chr(10).join(arithmetic(p)))}</pre>"
        f"<p>{esc(verdict(p))}<br>{'<br>'.join(esc(n) for n in notes(p))}</p>{speed_html}{sugg}</div>"
    )
