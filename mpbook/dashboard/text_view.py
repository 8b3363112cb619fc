"""The dashboard as lines of text, for a terminal IPython, a script, ``python -m mpbook demo``.

While a call runs: what each prompt generated since the last look (every ``stream_every_s``,
twice a second by default) and a line per engine (every ``every_s``); at the end a short
summary, unless the call was quick and had nothing to say.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .snapshots import Row
from .texts import visible
from .view import Frame, host_heading

TEXT_EVERY_S = 5.0  # a line per engine at most this often
STREAM_EVERY_S = 0.5  # new text of each prompt at most this often (at least 2 updates/s)


def printable(text: str) -> str:
    """``text`` on one line: line breaks shown as ⏎, other control characters left out."""
    return visible(text).replace("\n", "⏎")


def row_line(row: Row) -> str:
    tensors = f"; {row.tensors}" if row.tensors != "–" else ""
    experts = f"  expert load {row.expert_load}" if row.expert_load != "–" else ""
    step = f"  decode step {row.decode_step}" if row.decode_step != "–" else ""
    return (
        f"rank {row.rank} {row.device:<6} {row.phase:<8} mem {row.memory} (peak {row.peak}{tensors})  "
        f"{row.tokens_per_s} tok/s  collectives {row.collectives}{experts}{step}"
    )


def rows_text(frame: Frame) -> list[str]:
    """A line per engine; engines on several hosts: each host's under a line naming it."""
    groups = frame.by_host()
    if not groups:
        return [row_line(r) for r in frame.rows]
    lines = []
    for host, rows in groups:
        lines.append(host_heading(host, [r.rank for r in rows]))
        lines += [f"  {row_line(r)}" for r in rows]
    return lines


class TextView:
    """Plain text to ``out`` (default: the ``sys.stdout`` of the moment)."""

    updates_in_place = False

    def __init__(self, *, out: TextIO | None = None, every_s: float | None = None,
                 stream_every_s: float | None = None):
        self.out = out
        # Looked up here, not at import: tests and scripts may set the module's pace first.
        self.every_s = TEXT_EVERY_S if every_s is None else every_s
        self.stream_every_s = STREAM_EVERY_S if stream_every_s is None else stream_every_s
        self._call = -1
        self._last_rows = self._last_text = 0.0
        self._printed: dict[int, str] = {}  # prompt index -> its text as printed so far
        self.printed_rows = False

    def _write(self, text: str) -> None:
        out = self.out or sys.stdout  # looked up late: pytest and IPython swap sys.stdout
        out.write(text)
        out.flush()

    def _follow(self, frame: Frame) -> None:
        if frame.call != self._call:  # a new call: its own pace, its own texts
            self._call = frame.call
            self._last_rows = self._last_text = time.monotonic()
            self._printed = {}
            self.printed_rows = False

    def show(self) -> None:
        self._last_rows = self._last_text = time.monotonic()

    def render(self, frame: Frame) -> None:
        self._follow(frame)
        if frame.state != "running":
            return  # between calls a terminal prints nothing
        now = time.monotonic()
        if frame.prompts and now - self._last_text >= self.stream_every_s:
            self._last_text = now
            self._print_new_text(frame)
        if now - self._last_rows >= self.every_s:
            self._last_rows = now
            self.printed_rows = True
            stamp = f"[mpbook {frame.elapsed:5.1f} s]"
            lines = [f"{stamp} {line}" for line in rows_text(frame)]
            if len(frame.rows) > 1 and frame.history and frame.tokens:
                lines.append(f"{stamp} all ranks {frame.rate_label}")
            self._write("\n".join(lines) + "\n")

    def _print_new_text(self, frame: Frame) -> None:
        lines = []
        for prompt in frame.prompts:
            printed = self._printed.get(prompt.index, "")
            if prompt.text == printed:
                continue
            if printed and prompt.text.startswith(printed):
                lines.append(f"[{prompt.index}] …{printable(prompt.text[len(printed):])}")
            else:  # the first piece, or a decode that changed what came before: all of it
                lines.append(f"[{prompt.index}] {printable(prompt.text)}")
            self._printed[prompt.index] = prompt.text
        if lines:
            self._write("\n".join(lines) + "\n")

    def finish(self, frame: Frame) -> None:
        self._follow(frame)
        if self._printed:  # the rest of the texts whose beginning was printed
            self._print_new_text(frame)
        if frame.quiet and not self.printed_rows:
            return
        lines = [f"mpbook: {frame.headline}"] + [f"  {line}" for line in rows_text(frame)]
        self._write("\n".join(lines) + "\n")
