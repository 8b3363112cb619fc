"""Live tokens: what the choosing rank has generated so far, for the client to show as it grows.

The rank that chooses a replica's tokens keeps each prompt's new tokens and the time each
was chosen; the telemetry snapshot carries them (key ``stream``), so the engines' publisher
thread sends them a few times a second with the rest of the figures, and the client decodes
and shows each prompt's text while the cell runs. Running totals, replaced whole: a lost
snapshot costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


class TokenStream:
    """New tokens and their times per prompt (the prompt's index in the request)."""

    def __init__(self, prompts: Sequence[int], *, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        # Every key exists from the start: the publisher thread iterates these dicts while
        # the loop appends, and a dict must not change size under an iteration.
        self.tokens: dict[int, list[int]] = {i: [] for i in prompts}
        self.times: dict[int, list[float]] = {i: [] for i in prompts}

    def add(self, prompts: Sequence[int], tokens: Sequence[int], active: Sequence[bool]) -> None:
        """This step's token of each row; rows that had finished before it add nothing."""
        now = time.perf_counter() - self.started
        for prompt, token, live in zip(prompts, tokens, active):
            if live:
                self.tokens[prompt].append(int(token))
                self.times[prompt].append(now)

    def snapshot(self) -> dict:
        return {
            "rows": {i: list(t) for i, t in self.tokens.items()},
            "times": {i: list(t) for i, t in self.times.items()},
        }
