"""What a strategy run returns to the notebook: texts, token ids, speeds, memory, collectives,
the pipeline timeline; merged from every rank's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .layout import Layout
from .protocol import Event
from .units import format_bytes


@dataclass
class RunResult:
    """One data/pipeline/tensor run, as seen from the notebook.

    Per-rank lists are indexed by rank. Throughputs count real (unpadded) prompt tokens for
    the prefill and generated tokens for the decode, over the longest rank's time in that
    phase (ranks run concurrently, so that is the phase's wall time).
    """

    strategy: str
    model: str
    layout: Layout
    dtype: str
    microbatches: int
    max_new_tokens: int
    prompts: list[str]
    prompt_tokens: list[int]  # per prompt
    token_ids: list[list[int]]  # per prompt: the generated ids (padding after end-of-sequence)
    texts: list[str]
    logits: list[Any] | None  # forward pass: one (prompt_len, vocab) float32 tensor per prompt
    prefill_seconds: float
    decode_seconds: float
    peak_memory_bytes: list[int]
    weight_bytes: list[int]
    kv_cache_bytes: list[int]
    collectives: list[dict[str, int]]
    collective_seconds: list[float]
    timeline: list[Event]
    load_seconds: list[float] = field(default_factory=list)
    device_type: str = "cpu"
    tensor_peak_bytes: list[int | None] = field(default_factory=list)  # with track_tensors=True

    @property
    def engines(self) -> int:
        return self.layout.world_size

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token of each prompt comes out of the prefill; the decode makes the rest.
        decoded = len(self.prompts) * max(self.max_new_tokens - 1, 0)
        return decoded / self.decode_seconds if self.decode_seconds else 0.0

    def total_collectives(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for per_rank in self.collectives:
            for kind, n in per_rank.items():
                if n:
                    total[kind] = total.get(kind, 0) + n
        return total

    def summary(self) -> str:
        peak = ", ".join(format_bytes(b) for b in self.peak_memory_bytes)
        comm = ", ".join(f"{k} {v}" for k, v in sorted(self.total_collectives().items())) or "none"
        return (
            f"{self.strategy} ({self.layout}) on {self.engines} engine{'s' if self.engines != 1 else ''}: "
            f"prefill {self.prefill_tokens_per_s:,.0f} tok/s, decode {self.decode_tokens_per_s:,.1f} tok/s; "
            f"peak memory per rank [{peak}]; collectives: {comm}"
        )

    def record(self) -> dict[str, Any]:
        """The benchmark record of this run (JSON-ready)."""
        return {
            "strategy": self.strategy,
            "dp": self.layout.dp,
            "pp": self.layout.pp,
            "tp": self.layout.tp,
            "engines": self.engines,
            "batch": len(self.prompts),
            "microbatches": self.microbatches,
            "dtype": self.dtype,
            "prompt_tokens": sum(self.prompt_tokens),
            "new_tokens": self.max_new_tokens,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_memory_bytes": list(self.peak_memory_bytes),
            "weight_bytes": list(self.weight_bytes),
            "kv_cache_bytes": list(self.kv_cache_bytes),
            "collectives": self.total_collectives(),
        }

    # ------------------------------------------------------------------ plots
    def plot_timeline(self, phase: str = "prefill"):
        """The pipeline timeline of one phase ("prefill" or "decode") as a Gantt chart."""
        from .plots import plot_timeline

        return plot_timeline([e for e in self.timeline if e.phase == phase])

    def plot_memory(self, *, ax=None, title: str = "memory per rank"):
        """Per-rank memory: weights and KV cache, and the rest of the peak above them
        (activations on a GPU; on a CPU engine the peak is the process's, runtime included).
        ``ax``/``title``: as :func:`mpbook.plots.plot_memory`."""
        from .plots import plot_memory

        per_rank = {}
        for rank, (weights, kv, peak) in enumerate(zip(self.weight_bytes, self.kv_cache_bytes, self.peak_memory_bytes)):
            parts = {"weights": weights, "kv_cache": kv, "total": peak, "peak": peak}
            if self.device_type == "cuda":
                parts["activations"] = max(0, peak - weights - kv)
            per_rank[rank] = parts
        return plot_memory(per_rank, ax=ax, title=title)

    def plot_collectives(self):
        from .plots import plot_collectives

        return plot_collectives(dict(enumerate(self.collectives)), dict(enumerate(self.collective_seconds)))

    def __repr__(self) -> str:
        return f"<RunResult {self.summary()}>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.summary())


def merge(
    outputs, *, strategy: str, request, prompts: list[str], tokenizer, prompt_tokens: list[int], device_type: str,
) -> RunResult:
    """Combine the ranks' RankOutputs (in rank order) into one result, prompts in order.

    ``prompt_tokens``: each prompt's length in tokens (unpadded), as the client counted them."""
    n = len(prompts)
    token_ids: list[list[int] | None] = [None] * n
    logits: list[Any] = [None] * n
    for out in outputs:
        if not out.reports_tokens:
            continue
        for offset, index in enumerate(out.rows):
            if out.tokens is not None:
                token_ids[index] = out.tokens[offset]
            if out.logits is not None:
                logits[index] = out.logits[offset]
    origin = min(out.started for out in outputs)
    timeline = sorted(
        (
            Event(e.rank, e.stage, e.microbatch, e.phase, e.start + out.started - origin, e.end + out.started - origin)
            for out in outputs
            for e in out.events
        ),
        key=lambda e: (e.start, e.rank),
    )
    ids = [t or [] for t in token_ids]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids] if request.max_new_tokens else []
    return RunResult(
        strategy=strategy,
        model=request.model,
        layout=request.layout,
        dtype=request.dtype,
        microbatches=request.microbatches,
        max_new_tokens=request.max_new_tokens,
        prompts=list(prompts),
        prompt_tokens=list(prompt_tokens),
        token_ids=ids,
        texts=texts,
        logits=logits if not request.max_new_tokens else None,
        prefill_seconds=max(out.phase_seconds.get("prefill", 0.0) for out in outputs),
        decode_seconds=max(out.phase_seconds.get("decode", 0.0) for out in outputs),
        peak_memory_bytes=[out.peak_memory_bytes for out in outputs],
        weight_bytes=[out.weight_bytes for out in outputs],
        kv_cache_bytes=[out.kv_cache_bytes for out in outputs],
        collectives=[out.collectives for out in outputs],
        collective_seconds=[out.collective_seconds for out in outputs],
        timeline=timeline,
        load_seconds=[out.load_seconds for out in outputs],
        device_type=device_type,
        tensor_peak_bytes=[out.tensor_peak_bytes for out in outputs],
    )
