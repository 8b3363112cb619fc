"""Live text: each prompt's generation as it grows, from the engines' ``stream`` figures.

The rank that chooses a replica's tokens puts each prompt's new token ids (and when each
came) in its snapshots; the dashboard decodes them with the client's tokenizer (a ``decode``
callable the session passes in the run's description) and shows the texts while the run goes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Snapshot = Mapping[str, Any]


def visible(text: str) -> str:
    """``text`` without control characters (a random model's tokens decode to any byte),
    line breaks and tabs kept."""
    return "".join(c for c in text if c.isprintable() or c in "\n\t")


def call_stream(start: Snapshot | None, latest: Snapshot | None) -> Mapping[str, Any] | None:
    """The ``stream`` figure of ``latest`` if it belongs to this call, not to an earlier run.

    Engines drop the figure when a run ends, so a call's first snapshot has none; where an
    engine keeps it and numbers its runs (``run``), the same number as at the call's start
    means an earlier run's tokens."""
    stream = (latest or {}).get("stream")
    if not stream:
        return None
    before = (start or {}).get("stream")
    if before and stream.get("run") is not None and before.get("run") == stream.get("run"):
        return None
    return stream


@dataclass
class PromptText:
    """One prompt's generation so far."""

    index: int
    prompt: str
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds since the run began, per token
    text: str = ""
    final: bool = False  # the result's text, no longer growing

    def note(self) -> str:
        """``"12 tokens · first after 0.31 s"``."""
        if not self.ids:
            return "" if self.final else "waiting for the first token"
        words = f"{len(self.ids)} token{'s' if len(self.ids) != 1 else ''}"
        if self.times:
            words += f" · first after {self.times[0]:.2f} s"
        return words


class PromptTexts:
    """Each prompt's text as it grows, from the ``stream`` figures of the ranks that choose
    tokens. ``decode``: token ids -> text (the client's tokenizer); without one the count of
    tokens shows alone. Texts are decoded again only when their ids grew."""

    def __init__(self, prompts: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None):
        self.decode = decode
        self.prompts: dict[int, PromptText] = {i: PromptText(i, p) for i, p in enumerate(prompts)}
        self.updates = 0  # times a prompt's text grew (the benchmark reads it)

    def take(self, stream: Mapping[str, Any]) -> bool:
        """Merge one rank's stream; True when some prompt's text grew."""
        grew = False
        times = stream.get("times") or {}
        for key, ids in (stream.get("rows") or {}).items():
            index = int(key)
            line = self.prompts.get(index) or self.prompts.setdefault(index, PromptText(index, ""))
            if line.final or len(ids) <= len(line.ids):
                continue
            line.ids = list(ids)
            line.times = list(times.get(key, times.get(index, [])))
            line.text = self._decode(line.ids)
            grew = True
            self.updates += 1
        return grew

    def _decode(self, ids: list[int]) -> str:
        if self.decode is None:
            return ""
        try:
            return self.decode(ids)
        except Exception:  # a tokenizer's hiccup must not stop the dashboard: show the count
            return ""

    def settle(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None,
               token_times: Sequence[Sequence[float]] | None = None) -> None:
        """The run is over: each prompt shows the result's text, and its token count and first
        token's time are the result's too (the stream may have been seen a moment before its
        end, or not at all)."""
        for i, text in enumerate(texts):
            line = self.prompts.get(i) or self.prompts.setdefault(i, PromptText(i, ""))
            line.text, line.final = text, True
            if token_ids is not None and i < len(token_ids):
                line.ids = list(token_ids[i])
            if token_times is not None and i < len(token_times):
                line.times = list(token_times[i])

    def lines(self) -> list[PromptText]:
        return [self.prompts[i] for i in sorted(self.prompts)]
