"""What a strategy run returns to the notebook: texts, token ids, speeds, memory, collectives,
the pipeline timeline; merged from every rank's report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from fractions import Fraction
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
    token_ids: list[list[int]]  # per prompt: the new ids, up to and including the finishing one
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
    stop_reasons: list[str | None] = field(default_factory=list)  # per prompt: "eos", "stop" or "length"
    token_times: list[list[float]] = field(default_factory=list)  # per prompt: seconds from the run's start
    messages: list[Any] | None = None  # per prompt: the chat messages sent (with --chat), else None
    sampling: Any = None  # mpbook.protocol.Sampling of the run
    cell_seconds: float = 0.0  # the whole call as the client saw it: loading, run and transfer
    engine_seconds: list[float] = field(default_factory=list)  # per rank: the run on the engine, loading included
    expert_tokens: list[int] = field(default_factory=list)  # per rank: routes (token, expert) to its experts
    rank_rows: list[list[int]] = field(default_factory=list)  # per rank: the prompts its replica served
    rank_phase_seconds: list[dict[str, float]] = field(default_factory=list)  # per rank: seconds per phase
    chat_template: bool | None = None  # whether the model's tokenizer has one (None: not known)
    transports: list[dict[str, str]] = field(default_factory=list)  # per rank: group dims -> "mpi", "gloo", "nccl"
    step_breakdown: list[dict[str, float]] = field(default_factory=list)  # per rank: where decode time went (s)
    import_seconds: list[float] = field(default_factory=list)  # per rank: transformers and the model's code imported
    prepare_seconds: float = 0.0  # the client before it called the engines: the model resolved, prompts, checks
    microbatches_reason: str = ""  # a pipeline's: why this many micro-batches (the default, or as asked)
    compiled: bool = False  # --compile: the decode step ran compiled (mpbook.engine.compiled)
    # --compile: per rank, the seconds this cell spent compiling before its prefill; None
    # where the rank compiled nothing (its shapes were compiled by an earlier cell)
    compile_seconds: list[float | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # per rank: its engine's host name

    def cell_parts(self) -> list[tuple[str, float]]:
        """Where the call's time went, in parts that add up to ``cell_seconds``: the client's
        preparation, the engines' importing and loading (the longest rank's), with ``--compile``
        its compiling, the prefill and the decode (as their rates count them), and the rest, ``client & transfer``: the call
        to the engines and back, their set-up around the phases, and merging the result."""
        # One rank's own parts, the rank that was busiest: maxima taken over different ranks
        # (one imported longest, another loaded longest) would add up to more than the call.
        ranks = range(len(self.rank_phase_seconds))

        def engine_parts(r: int) -> list[tuple[str, float]]:
            phases = self.rank_phase_seconds[r]
            return [("importing", _of(self.import_seconds, r)), ("loading", _of(self.load_seconds, r)),
                    ("compiling", phases.get("compiling", 0.0)),
                    ("prefill", phases.get("prefill", 0.0)), ("decode", phases.get("decode", 0.0))]

        busiest = max(ranks, key=lambda r: sum(s for _, s in engine_parts(r)), default=None)
        engine = engine_parts(busiest) if busiest is not None else [  # no per-rank phases known
            ("importing", max(self.import_seconds, default=0.0)), ("loading", max(self.load_seconds, default=0.0)),
            ("compiling", max((s for s in self.compile_seconds if s), default=0.0)),
            ("prefill", self.prefill_seconds), ("decode", self.decode_seconds)]
        if not self.compiled:  # a part only of --compile runs
            engine = [(name, seconds) for name, seconds in engine if name != "compiling"]
        parts = [("preparing", self.prepare_seconds), *engine]
        return parts + [("client & transfer", max(0.0, self.cell_seconds - sum(s for _, s in parts)))]

    @property
    def engines(self) -> int:
        return self.layout.world_size

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token of each prompt comes out of the prefill; the decode makes the rest.
        decoded = sum(max(len(t) - 1, 0) for t in self.token_ids)
        return decoded / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def ttft_s(self) -> list[float | None]:
        """Per prompt: time to first token, from the start of the run on the engines (the
        model loaded), as serving benchmarks count it from the request."""
        return [times[0] if times else None for times in self.token_times]

    def itl_s(self, q: float = 50) -> list[float | None]:
        """Per prompt: the ``q``-th percentile of its inter-token latencies (gaps between
        consecutive new tokens), e.g. ``itl_s(50)`` the median, ``itl_s(90)`` the p90."""
        return [percentile([b - a for a, b in zip(times, times[1:])], q) for times in self.token_times]

    def latency(self) -> dict[str, float]:
        """TTFT and inter-token latency pooled over the prompts, median and p90, in seconds
        (empty for a forward pass); ITL keys only when some prompt has two tokens or more."""
        ttft = [t for t in self.ttft_s if t is not None]
        gaps = [b - a for times in self.token_times for a, b in zip(times, times[1:])]
        if not ttft:
            return {}
        out = {"ttft_median_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90)}
        if gaps:
            out.update(itl_median_s=percentile(gaps, 50), itl_p90_s=percentile(gaps, 90))
        return out

    def latency_summary(self) -> str:
        """TTFT and inter-token latency over the prompts (median and p90), in milliseconds."""
        return latency_words(self.latency())

    def total_collectives(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for per_rank in self.collectives:
            for kind, n in per_rank.items():
                if n:
                    total[kind] = total.get(kind, 0) + n
        return total

    def tokens_per_s_by_rank(self, phase: str) -> list[float | None]:
        """Per rank: its replica's tokens/s in ``phase`` ("prefill" or "decode"), counted as
        the run's own rates are: the replica's prompt tokens, or its new tokens after each
        prompt's first, over the longest time any rank of the replica spent in that phase."""
        seconds: dict[tuple[int, ...], float] = {}
        for rows, phases in zip(self.rank_rows, self.rank_phase_seconds):
            seconds[tuple(rows)] = max(seconds.get(tuple(rows), 0.0), phases.get(phase, 0.0))
        out: list[float | None] = []
        for rows in self.rank_rows:
            if phase == "prefill":
                tokens = sum(self.prompt_tokens[p] for p in rows)
            else:
                tokens = sum(max(len(self.token_ids[p]) - 1, 0) for p in rows) if self.max_new_tokens else 0
            spent = seconds[tuple(rows)]
            out.append(tokens / spent if tokens and spent > 0 else None)
        return out

    def step_ms(self) -> list[dict[str, float]]:
        """Per rank that decoded: mean milliseconds per decode step of each part
        (:mod:`mpbook.engine.steps`) and of the whole step (``steps``)."""
        from .engine.steps import PARTS, START

        return [{part: 1e3 * b.get(part, 0.0) / b["count"] for part in (*PARTS, START, "steps")}
                for b in self.step_breakdown if b.get("count")]

    def step_words(self) -> str:
        """Where a decode step's time went, per rank (:meth:`step_ms`); "" when no rank decoded."""
        from .engine.steps import PARTS, START

        ranks = self.step_ms()
        if not ranks:
            return ""
        parts = ", ".join(f"{part} {'/'.join(f'{r[part]:.2f}' for r in ranks)}" for part in PARTS)
        step = "/".join(f"{r['steps']:.2f}" for r in ranks)
        words = f"decode step per rank, ms: {step} = {parts}"
        if any(r[START] >= 0.005 for r in ranks):  # a pipeline's drain, shown apart from its steady waits
            words += (f" (of the waiting, {'/'.join(f'{r[START]:.2f}' for r in ranks)} in micro-batches' first "
                      "steps, once per run: later stages still in the prefill)")
        return words

    def compile_words(self) -> str:
        """With ``--compile``: how long compiling the decode step took in this cell, or that
        an earlier cell's compiled step was reused; "" without ``--compile``."""
        if not self.compiled:
            return ""
        spent = [s for s in self.compile_seconds if s is not None]
        if not spent:
            return "decode step compiled (static KV cache): reused from an earlier cell of this shape"
        return (f"decode step compiled (static KV cache) in {max(spent):.1f} s before the prefill, "
                "not counted in tok/s; later cells of this shape reuse it")

    def transport_words(self) -> str:
        """What the run's groups moved tensors over: ``"mpi"``, or ``"tp: mpi, pp: gloo"``."""
        by_dims: dict[str, set[str]] = {}
        for per_rank in self.transports:
            for dims, transport in per_rank.items():
                by_dims.setdefault(dims, set()).add(transport)
        names = {t for found in by_dims.values() for t in found}
        if len(names) <= 1:
            return next(iter(names), "")
        return ", ".join(f"{dims}: {'/'.join(sorted(found))}" for dims, found in sorted(by_dims.items()))

    def summary(self) -> str:
        """What the run did, one short line per figure (a notebook wraps a long line anywhere,
        mid-word too): the layout, tokens and why each prompt stopped, speeds, latency,
        memory, collectives, the expert load, how tokens were chosen, the chat template."""
        head = f"{self.strategy} ({self.layout}) on {self.engines} engine{'s' if self.engines != 1 else ''}:"
        lines = []
        if self.layout.pp > 1:
            why = f" ({self.microbatches_reason})" if self.microbatches_reason else ""
            lines.append(f"{self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''} per replica{why}")
        if self.max_new_tokens:
            ended = {}
            for reason in self.stop_reasons:
                ended[reason] = ended.get(reason, 0) + 1
            why = ", ".join(f"{n} by {r}" for r, n in sorted(ended.items(), key=lambda kv: str(kv[0])) if r)
            lines.append(f"{self.new_tokens} new tokens ({why})" if why else f"{self.new_tokens} new tokens")
            lines.append(f"prefill {self.prefill_tokens_per_s:,.0f} tok/s, decode {self.decode_tokens_per_s:,.1f} tok/s")
            latency = self.latency_summary()
            if latency:
                lines.append(latency)
        else:
            lines.append(f"forward pass, {self.prefill_tokens_per_s:,.0f} tok/s")
        lines.append(f"{self.memory_words()}: [{', '.join(format_bytes(b) for b in self.peak_memory_bytes)}]")
        comm = ", ".join(f"{k} {v}" for k, v in sorted(self.total_collectives().items())) or "none"
        over = self.transport_words()
        lines.append(f"collectives: {comm}" + (f" over {over}" if over and comm != "none" else ""))
        steps = self.step_words()
        if steps:
            lines.append(steps)
        compiled = self.compile_words()
        if compiled:
            lines.append(compiled)
        if any(self.expert_tokens):
            lines.append(f"expert load per rank (routes to its experts): [{', '.join(map(str, self.expert_tokens))}]")
        if self.max_new_tokens:
            lines.append(f"tokens chosen: {self._how_chosen()}")
        chat = self._chat_words()
        if chat:
            lines.append(chat)
        return "\n".join([head] + [piece for line in lines for piece in _short_lines(line)])

    def memory_words(self) -> str:
        """What :attr:`peak_memory_bytes` is: this run's peak on each rank, of torch's allocator
        on a GPU, of the whole process (the Python runtime included) on a CPU engine."""
        what = "torch allocated" if self.device_type == "cuda" else "process RSS"
        return f"peak memory per rank in this run ({what})"

    def _chat_words(self) -> str:
        if self.messages is not None:
            return "chat template applied (--no-chat for plain text)"
        if self.chat_template is False:
            return "no chat template (the model has none): plain text"
        if self.chat_template:
            return "plain text (--no-chat): chat template not applied"
        return ""

    def _how_chosen(self) -> str:
        s = self.sampling
        if s is None or not s.do_sample:
            penalty = f", repetition penalty {s.repetition_penalty:g}" if s is not None and s.repetition_penalty != 1 else ""
            return "greedy" + penalty
        knobs = [f"temperature {s.temperature:g}"]
        if s.top_k:
            knobs.append(f"top-k {s.top_k}")
        if s.top_p < 1:
            knobs.append(f"top-p {s.top_p:g}")
        if s.repetition_penalty != 1:
            knobs.append(f"repetition penalty {s.repetition_penalty:g}")
        return f"sampled ({', '.join(knobs)}, seed {s.seed})"

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
            "generated_tokens": self.new_tokens,
            "ttft_s": list(self.ttft_s),
            "itl_median_s": self.itl_s(50),
            "itl_p90_s": self.itl_s(90),
            "latency": self.latency(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_memory_bytes": list(self.peak_memory_bytes),
            "weight_bytes": list(self.weight_bytes),
            "kv_cache_bytes": list(self.kv_cache_bytes),
            "collectives": self.total_collectives(),
        }

    # ------------------------------------------------------------------ plots
    def plot_timeline(self, phase: str | None = None):
        """The pipeline timeline as a Gantt chart: the prefill and every decode step, or
        ``phase`` ("prefill" or "decode") alone; as :func:`mpbook.plots.plot_timeline`."""
        from .plots import plot_timeline

        return plot_timeline(self, phase)

    def plot_memory(self, *, ax=None, title: str = "memory per rank"):
        """Per-rank memory: weights and KV cache, and the rest of this run's peak above them
        (activations on a GPU; on a CPU engine the peak is the process's, runtime included).
        ``ax``/``title``: as :func:`mpbook.plots.plot_memory`."""
        from .plots import plot_memory

        return plot_memory(self, ax=ax, title=title)

    def plot_collectives(self):
        """Collectives per rank, counts and seconds: :func:`mpbook.plots.plot_collectives`."""
        from .plots import plot_collectives

        return plot_collectives(self)

    def __repr__(self) -> str:
        return f"<RunResult {self.summary().splitlines()[0]} {self.new_tokens} new tokens>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.summary())


SUMMARY_WIDTH = 80  # characters a summary line has at most (unless one word is longer)


def _short_lines(figure: str) -> list[str]:
    """One figure of the summary, indented, in lines of at most SUMMARY_WIDTH characters, cut
    between words only (a notebook would wrap a long line anywhere, mid-word too)."""
    import textwrap

    return textwrap.wrap(figure, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="      ",
                         break_long_words=False, break_on_hyphens=False)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, None for none: numpy's default (linear)
    percentile, as vLLM's serving benchmark reports them, which is ``statistics.quantiles``'
    inclusive method (``q`` = 90 is the 9th of its 10 cuts). The one percentile of mpbook's
    figures and benchmarks."""
    if not values:
        return None
    share = Fraction(str(q)) / 100
    if len(values) == 1 or share == 0:
        return min(values)
    if share == 1:
        return max(values)
    return statistics.quantiles(values, n=share.denominator, method="inclusive")[share.numerator - 1]


def _of(values, rank: int) -> float:
    return values[rank] if rank < len(values) else 0.0


def merge(
    outputs, *, strategy: str, request, prompts: list[str], tokenizer, prompt_tokens: list[int], device_type: str,
) -> RunResult:
    """Combine the ranks' RankOutputs (in rank order) into one result, prompts in order.

    ``prompt_tokens``: each prompt's length in tokens (unpadded), as the client counted them."""
    n = len(prompts)
    token_ids: list[list[int] | None] = [None] * n
    logits: list[Any] = [None] * n
    times: list[list[float]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    # The run starts when its first rank starts (a later stage may start later, after a longer
    # load, and would count its tokens from there): times on one clock, as the timeline's.
    origin = min((out.started for out in outputs), default=0.0)
    for out in outputs:
        if not out.reports_tokens:
            continue
        shift = out.started - origin
        for offset, index in enumerate(out.rows):
            if out.tokens is not None:
                token_ids[index] = out.tokens[offset]
            if out.logits is not None:
                logits[index] = out.logits[offset]
            if out.token_times is not None:
                times[index] = [t + shift for t in out.token_times[offset]]
            if out.stop_reasons is not None:
                reasons[index] = out.stop_reasons[offset]
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
        import_seconds=[out.import_seconds for out in outputs],
        device_type=device_type,
        tensor_peak_bytes=[out.tensor_peak_bytes for out in outputs],
        stop_reasons=reasons if request.max_new_tokens else [],
        token_times=times if request.max_new_tokens else [],
        sampling=request.sampling,
        engine_seconds=[out.engine_seconds for out in outputs],
        expert_tokens=[out.expert_tokens for out in outputs],
        rank_rows=[list(out.rows) for out in outputs],
        rank_phase_seconds=[dict(out.phase_seconds) for out in outputs],
        transports=[dict(out.transports) for out in outputs],
        step_breakdown=[dict(out.step_breakdown) for out in outputs],
        compiled=request.compile and request.max_new_tokens > 1,
        compile_seconds=[out.compile_seconds for out in outputs],
        hosts=[out.host for out in outputs],
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def latency_words(latency: dict[str, float]) -> str:
    """``Result.latency()`` (or a bench record's) as the summary line says it, in milliseconds."""
    if not latency:
        return ""
    parts = [f"TTFT median {latency['ttft_median_s'] * 1e3:.0f} ms p90 {latency['ttft_p90_s'] * 1e3:.0f} ms"]
    if "itl_median_s" in latency:
        parts.append(f"ITL median {latency['itl_median_s'] * 1e3:.1f} ms p90 {latency['itl_p90_s'] * 1e3:.1f} ms")
    return ", ".join(parts)
