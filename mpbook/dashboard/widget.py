"""The dashboard as ipywidgets: built and displayed once, then only values change.

A status line, a grid (one row per engine), one line per prompt whose text grows while a
generation runs, and a small SVG plot of the cluster's tokens/s. Assigning a value equal to
the current one sends nothing to the browser, so a refresh costs only what changed.

CSS classes name the parts in the page, for styling and for tools that read it (the browser
test): ``.mpbook-dashboard``, ``.mpbook-status``, ``.mpbook-rank-0.mpbook-col-tokens-s``,
``.mpbook-prompt-0`` (its generated text in ``.mpbook-generated``), ``.mpbook-throughput``, and
with engines on several hosts a heading row over each host's ranks, ``.mpbook-host``.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from ..layout import ranks_by_host
from .snapshots import Row
from .texts import PromptText, visible
from .view import Frame, host_heading

COLUMNS = ("rank", "host", "device", "phase", "tokens/s", "collectives", "memory", "peak", "tensors", "expert load",
           "decode step")
CUDA_COLUMNS = ("reserved", "GPU used / total")
PROMPT_CHARS = 60  # of each prompt a line shows before its generated text
TEXT_CHARS = 600  # of each generated text a line shows (its end; the result keeps all of it)

PHASE_COLOURS = {
    "idle": "#777777",
    "importing": "#b8860b",
    "loading": "#b8860b",
    "compiling": "#b8860b",
    "prefill": "#1f77b4",
    "decode": "#2ca02c",
    "failed": "#d62728",
    "waiting": "#777777",
}
STATE_MARKS = {"running": "●", "done": "✓", "failed": "✗", "interrupted": "■", "stopped": "■"}
STATE_COLOURS = {"done": "#2ca02c", "failed": "#d62728", "running": "#1f77b4"}


def in_notebook() -> bool:
    """True in a Jupyter kernel (widgets can render), False in a terminal or script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and getattr(shell, "kernel", None) is not None


def css_name(column: str) -> str:
    """A column's name as a CSS class suffix: "tokens/s" -> "tokens-s"."""
    return "-".join("".join(c if c.isalnum() else " " for c in column.lower()).split())


def cell_texts(row: Row) -> dict[str, str]:
    """What each column of ``row`` says, as text."""
    return {
        "rank": str(row.rank), "host": row.host, "device": row.device, "phase": row.phase,
        "tokens/s": row.tokens_per_s, "collectives": row.collectives, "memory": row.memory,
        "peak": row.peak, "tensors": row.tensors, "expert load": row.expert_load, "decode step": row.decode_step, "reserved": row.reserved,
        "GPU used / total": row.gpu,
    }


def memory_bar_html(label: str, share: float | None, *, width: int = 60) -> str:
    """The process's memory as a bar against the device's capacity, its words beside it.

    The share is rounded to whole percents: a refresh that moves the bar by less sends nothing.
    """
    if share is None:
        return f"<span>{escape(label)}</span>"
    filled = round(share * 100)
    colour = "#d62728" if filled >= 90 else "#1f77b4"
    return (
        '<span style="display:inline-flex;align-items:center;gap:6px">'
        f'<span title="{filled}% of the device" style="display:inline-block;width:{width}px;height:8px;'
        f'background:#e6e6e6;border-radius:2px;overflow:hidden">'
        f'<span style="display:block;width:{max(filled, 1 if share > 0 else 0)}%;height:100%;background:{colour}"></span></span>'
        f"<span>{escape(label)}</span></span>"
    )


def prompt_html(line: PromptText) -> str:
    prompt = visible(line.prompt).replace("\n", " ")
    prompt = prompt if len(prompt) <= PROMPT_CHARS else prompt[: PROMPT_CHARS - 1] + "…"
    text = visible(line.text)
    text = text if len(text) <= TEXT_CHARS else "…" + text[-TEXT_CHARS:]
    note = line.note()
    return (
        # The widgets' own line height (a form row's) would space wrapped text far apart.
        '<div style="white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);font-size:12px;'
        'line-height:1.4;margin:1px 0">'
        f'<span style="color:#777">[{line.index}] {escape(prompt)} →</span> '
        f'<span class="mpbook-generated">{escape(text)}</span>'
        + (f' <span class="mpbook-prompt-note" style="color:#999">({escape(note)})</span>' if note else "")
        + "</div>"
    )


def sparkline_svg(values: Sequence[float], label: str, *, width: int = 360, height: int = 56) -> str:
    """A small line plot as inline SVG: cheap to rebuild four times a second. Scaled to its
    own highest point; with no point above 0 it draws the axis alone."""
    top = max(values, default=0.0)
    pad = 14
    line = ""
    if len(values) >= 2 and top > 0:
        step = width / (len(values) - 1)
        points = " ".join(f"{i * step:.1f},{pad + (height - pad) * (1 - v / top):.1f}" for i, v in enumerate(values))
        line = f'<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="{points}"/>'
    return (
        f'<svg width="{width}" height="{height + 2}" xmlns="http://www.w3.org/2000/svg" '
        f'style="font: 11px sans-serif; background: #fafafa">'
        f'<text x="2" y="11" fill="#444">{escape(label)}</text>'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#ccc"/>{line}</svg>'
    )


def status_html(state: str, headline: str) -> str:
    mark = STATE_MARKS.get(state, "·")
    colour = STATE_COLOURS.get(state, "#555555")
    return f'<span style="color:{colour}"><b>{mark}</b></span> mpbook: {escape(headline)}'


class WidgetView:
    """ipywidgets, built once for ``ranks``; ``cuda`` adds the allocator and GPU columns;
    ``hosts`` (rank -> host): engines on several hosts get a heading row per host."""

    updates_in_place = True

    def __init__(self, ranks: Sequence[int], *, cuda: bool, hosts: dict[int, str] | None = None):
        import ipywidgets as w

        self._w = w
        self.columns = COLUMNS + (CUDA_COLUMNS if cuda else ())
        self.status = w.HTML()
        header = [w.HTML(f"<b>{name}</b>") for name in self.columns]
        self.cells: dict[int, dict[str, Any]] = {
            r: {c: (w.HTML() if c == "memory" else w.Label()) for c in self.columns} for r in ranks
        }
        self._texts: dict[int, dict[str, str]] = {r: {c: "" for c in self.columns} for r in ranks}
        self.host_headings: list[Any] = []  # engines on several hosts: a heading per host
        grid = w.GridBox(
            children=header + self._rows_by_host(ranks, hosts or {}),
            layout=w.Layout(grid_template_columns=f"repeat({len(self.columns)}, max-content)", grid_gap="0 14px"),
        )
        self.prompts = w.VBox()
        self.prompt_lines: list[Any] = []
        self.plot = w.HTML()
        self.widget = w.VBox([self.status, grid, self.prompts, self.plot])
        self.widget.add_class("mpbook-dashboard")
        self.status.add_class("mpbook-status")
        grid.add_class("mpbook-grid")
        self.prompts.add_class("mpbook-prompts")
        self.plot.add_class("mpbook-throughput")
        for r, cells in self.cells.items():
            for name, cell in cells.items():
                cell.add_class(f"mpbook-rank-{r}")
                cell.add_class(f"mpbook-col-{css_name(name)}")

    def _rows_by_host(self, ranks: Sequence[int], hosts: dict[int, str]) -> list[Any]:
        """The grid's cells, rank by rank; on several hosts each host's ranks under a heading
        that spans the row (``.mpbook-host``)."""
        groups = ranks_by_host([hosts.get(r, "") for r in ranks])
        if len({host for host, _ in groups}) < 2:
            return [cell for r in ranks for cell in self.cells[r].values()]
        children: list[Any] = []
        for host, positions in groups:
            members = [ranks[i] for i in positions]
            heading = self._w.HTML(f"<b>{escape(host_heading(host, members))}</b>",
                                   layout=self._w.Layout(grid_column="1 / -1"))
            heading.add_class("mpbook-host")
            self.host_headings.append(heading)
            children.append(heading)
            children += [cell for r in members for cell in self.cells[r].values()]
        return children

    def show(self) -> None:
        # Elsewhere (a script driving widgets, a test) display() would print the widget's repr.
        if in_notebook():
            from IPython.display import display

            display(self.widget)

    def render(self, frame: Frame) -> None:
        # The status goes last: each value is its own message to the front end, applied in
        # order, so once it says "done" the rows and texts above it show the final figures.
        for row in frame.rows:
            cells = self.cells.get(row.rank)
            if cells is None:
                continue
            texts = cell_texts(row)
            for name in self.columns:
                self._texts[row.rank][name] = texts[name]
                if name == "memory":
                    cells[name].value = memory_bar_html(row.memory, row.memory_share)
                else:
                    cells[name].value = texts[name]
            cells["phase"].style.text_color = PHASE_COLOURS.get(row.phase, "#000000")
        self._render_prompts(frame.prompts)
        if frame.tokens:
            self.plot.value = sparkline_svg(list(frame.history), frame.rate_label)
            self.plot.layout.display = None
        else:  # no tokens in this call: no empty plot of them
            self.plot.value = ""
            self.plot.layout.display = "none"
        self.status.value = status_html(frame.state, frame.headline)

    finish = render  # the end state is one more frame; the status line says how it ended

    def _render_prompts(self, prompts: Sequence[PromptText]) -> None:
        if len(prompts) != len(self.prompt_lines):
            # Once per call at most (a generation with another number of prompts): the lines
            # are made, then only their values change.
            self.prompt_lines = self.prompt_lines[: len(prompts)]
            for i in range(len(self.prompt_lines), len(prompts)):
                line = self._w.HTML()
                line.add_class("mpbook-prompt")
                line.add_class(f"mpbook-prompt-{i}")
                self.prompt_lines.append(line)
            self.prompts.children = tuple(self.prompt_lines)
        for line, prompt in zip(self.prompt_lines, prompts):
            line.value = prompt_html(prompt)

    # ----------------------------------------------------------------- reading it back
    def values(self) -> dict[int, dict[str, str]]:
        """What the grid shows now, rank -> column -> text (for tests and tools)."""
        return {r: dict(texts) for r, texts in self._texts.items()}

    def prompt_values(self) -> list[str]:
        """The HTML of each prompt's line now (for tests and tools)."""
        return [line.value for line in self.prompt_lines]

