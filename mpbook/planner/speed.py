"""How fast a layout will run, predicted from what it does and what the machine measured.

Per rank, one micro-batch of ``b`` rows through the rank's stage, one decode step:

- **weights**: the bytes of every matrix the stage multiplies (its layers at 1/tp, the experts
  a step's tokens route to at 1/ep, the LM head on the last stage, its vocabulary at 1/tp),
  at the measured cost per weight byte for ``b`` rows (:mod:`.calibration`: memory bandwidth at
  one row, the matmul rate at many);
- **KV cache**: the keys and values the step's attention reads (the cache at its mean length
  over the decode), at the one-row cost per byte (streamed once, as a matrix-vector product);
- **host**: Python and dispatch, the family's measured time per decoder layer times the
  stage's layers, plus the base model's work around them (mask, positions, rotary tables) on
  every stage, plus the final norm, head and the token's choice on the last stage;
- **collectives**: each all-reduce and all-gather the plan puts in a layer (tensor parallel's
  row-split projections, the experts' sum), and the vocabulary-split head's gather, at the
  transport's measured latency + bytes / bandwidth, the latency the one seen inside a real
  step for the group's size (the ranks reach a collective apart, and the wait is part of it);
- **sends**: a pipeline stage's activation to the next stage, the tokens back to the first.

A replica of ``R`` rows in ``m`` micro-batches over ``p`` stages: one token for every row takes
``T = max(C, m x slowest stage)``, where ``C`` (a micro-batch's way round every stage) bounds it
when ``m < p`` (stages idle: the bubble) and the slowest stage's ``m`` steps when ``m >= p``.
Decode tokens/s is the sum over replicas of ``R / T``; the prefill is GPipe's ``(m + p - 1)``
slowest micro-batch stage passes for ``b x prompt`` rows.

CPU engines share the memory bus and the cores: each rate is the one measured with every engine
of the host busy at once ("together"; a pipeline's waiting stages poll, so they count too), or
"alone" on a host with one engine. A tensor-parallel rank waiting in an all-reduce counts as
busy too: the wait is for peers that, with more engines than cores, take turns on the cores
with every other engine, and the all-reduce's latency inside a step is fitted with the compute
priced so (see :meth:`Calibration.all_reduce_in_step`).
Not modelled: the prefill's attention beyond its matmuls' FLOPs, the skew between ranks that a
collective waits out (it is in the latency fitted inside a step), and a step's work the
calibration does not see (streaming the text, telemetry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..layout import Layout
from ..protocol import ELEMENT_SIZE
from ..units import format_bytes, split_evenly
from .calibration import Calibration, HostTime, Rates
from .ranks import PlannedModel, RankMemory
from .workload import Workload

PARTS = ("weights", "kv cache", "host", "collectives", "sends")
REFERENCE_FAMILY = "llama"  # whose host time stands in for a family not measured yet


@dataclass(frozen=True)
class RankWork:
    """What one rank does in one decode step of one micro-batch, independent of the machine."""

    rank: int
    stage: int
    rows: int  # rows of its (largest) micro-batch
    layers: int
    last: bool
    weight_bytes: float  # matrices multiplied per step (experts: the routed share)
    kv_bytes: float  # keys and values read per step, at the cache's mean length over the decode
    all_reduces: int  # per step
    all_reduce_bytes: int  # each
    group: int  # ranks in its collectives (its tp group; its ep group without tp)
    gathers: int  # per step: all-gathers of the head's logits
    gather_bytes: int
    sends: int  # per step: activation to the next stage (+ tokens back to the first)
    send_bytes: int


@dataclass(frozen=True)
class RankSpeed:
    """One rank's predicted decode step of one micro-batch, by part (seconds), and its prefill."""

    work: RankWork
    parts: dict[str, float]
    prefill_s: float

    @property
    def step_s(self) -> float:
        return sum(self.parts.values())


@dataclass(frozen=True)
class SpeedPrediction:
    """Predicted decode and prefill speed of one layout on one calibrated machine."""

    layout: Layout
    microbatches: int
    ranks: list[RankSpeed]
    decode_round_s: list[float]  # per replica: time for each of its rows to get one token
    decode_tokens_per_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    bubble: float  # the decode's idle share of a pipeline stage
    busy_engines: float  # engines of a host working at once, for the rates
    family_measured: bool  # False: the reference family's host time stood in
    calibration: Calibration = field(repr=False)

    @property
    def bound(self) -> str:
        """What most of the slowest rank's step is: "memory-bound (weights)", "host-bound", ..."""
        slowest = max(self.ranks, key=lambda r: r.step_s)
        part = max(slowest.parts, key=slowest.parts.get)
        if part in ("weights", "kv cache"):
            rows = slowest.work.rows
            rates = self.calibration.rates(self.busy_engines)
            memory = rates.linear_seconds(1.0, 1) * rows / max(rates.linear_seconds(1.0, rows), 1e-30)
            kind = "memory-bound" if memory > 0.5 else "compute-bound"
            return f"{kind} ({part})"
        return f"{part}-bound"

    def arithmetic(self) -> list[str]:
        return arithmetic(self)

    def words(self) -> str:
        """One line: decode and prefill tokens/s and what limits them."""
        return (f"predicted decode {self.decode_tokens_per_s:,.0f} tok/s "
                f"({self.decode_round_s[0] * 1e3:.1f} ms a token for every row), prefill "
                f"{self.prefill_tokens_per_s:,.0f} tok/s; {self.bound}"
                + (f", bubble {self.bubble:.0%}" if self.layout.pp > 1 else ""))


def layout_work(model: PlannedModel, layout: Layout, work: Workload, ranks: list[RankMemory]) -> list[RankWork]:
    """Every rank's decode step of one micro-batch: bytes read, collectives, sends."""
    from ..models.structure import structure

    s = structure(model.config, model.plans)
    e = ELEMENT_SIZE[work.dtype]
    dims = model.dims
    reduces_per_layer, gathers_per_layer = _layer_collectives(s) if layout.tp > 1 else (0, 0)
    # A vocabulary-split embedding sums its ranks' rows (one all-reduce), a width-split one
    # gathers them (mpbook.parallel.tensor).
    embedding = s.tp_rules().get(s.embedding) if layout.tp > 1 else None
    embedding_reduces, embedding_gathers = int(embedding == "embedding_rowwise"), int(embedding == "embedding_colwise")
    vocab_tp = layout.tp if model.vocab_parallel_head else 1
    mean_kv = (work.prompt_len + (work.max_new_tokens - 1) / 2) / max(work.tokens, 1)
    out = []
    for r in ranks:
        if not r.rows:
            continue
        held = _bytes_by_kind(model, layout, r.rank, work)
        b = r.microbatch_rows
        experts = held.get("experts", 0) * _routed_share(model.config, b)
        head = dims.vocab * dims.hidden * e / vocab_tp if r.pp == layout.pp - 1 else 0
        weights = held.get("layers", 0) + held.get("norm", 0) + held.get("other", 0) + experts + head
        last, first = r.pp == layout.pp - 1, r.pp == 0
        moe_layers = _moe_layers(model, r.layers)
        out.append(RankWork(
            rank=r.rank, stage=r.pp, rows=b, layers=len(r.layers), last=last,
            weight_bytes=weights, kv_bytes=r.kv_cache * (b / r.rows) * mean_kv,
            all_reduces=(len(r.layers) * reduces_per_layer + (moe_layers if layout.ep > 1 else 0)
                         + (embedding_reduces if first else 0)),
            all_reduce_bytes=b * dims.hidden * e,
            group=layout.tp if layout.tp > 1 else layout.ep,
            gathers=(len(r.layers) * gathers_per_layer + (1 if last and vocab_tp > 1 else 0)
                     + (embedding_gathers if first else 0)),
            gather_bytes=b * dims.vocab * 4,  # the logits, gathered in float32
            sends=(0 if layout.pp == 1 else 1),
            send_bytes=b * dims.hidden * e if not last else b * 8,
        ))
    return out


def predict(model: PlannedModel, layout: Layout, work: Workload, ranks: list[RankMemory],
            calibration: Calibration) -> SpeedPrediction:
    """The layout's decode and prefill speed (see the module's docstring)."""
    family = model.config.get_text_config(decoder=True).model_type
    measured = calibration.has_host_time(family)
    works = layout_work(model, layout, work, ranks)
    # Every engine of the host counts as busy, a pipeline's waiting stages and a tensor-parallel
    # rank waiting in an all-reduce too. Rates at a pipeline's mean occupancy instead predicted
    # 4 stages on 2 cores nearly twice as fast as they ran; rates at a tp layout's share of the
    # step outside its all-reduces (as if the waiting ranks left their cores to the others)
    # predicted groups of 2 on 4 engines of 2 cores 31-45% fast. Counted busy, with the
    # all-reduce inside a step fitted per group size, every layout there came within 23%.
    everyone = float(min(layout.world_size, calibration.engines_per_host))
    family = family if measured else REFERENCE_FAMILY
    return _at(works, layout, work, calibration, everyone, family, measured)


def _at(works: list[RankWork], layout: Layout, work: Workload, calibration: Calibration, busy: float,
        family: str, measured: bool) -> SpeedPrediction:
    rates = calibration.rates(busy)
    none = HostTime(0.0, 0.0, 0.0)
    speeds = []
    for w in works:
        host = rates.host_time(family, w.rows) or none
        speeds.append(RankSpeed(w, _step_parts(w, rates, host, calibration),
                                _prefill_s(w, work, rates, host, calibration)))
    by_replica: dict[int, list[RankSpeed]] = {}
    for s in speeds:
        by_replica.setdefault(layout.coords(s.work.rank).dp, []).append(s)
    replica_rows = split_evenly(work.batch, layout.dp)
    m = work.microbatches
    rounds, tokens, prefills, busy_shares = [], 0.0, [], []
    for dp, members in sorted(by_replica.items()):
        stages = _stage_times(members, layout.pp, lambda s: s.step_s)
        cycle = sum(stages)
        round_s = max(cycle, m * max(stages))
        rounds.append(round_s)
        tokens += len(replica_rows[dp]) / round_s
        busy_shares.append(m * cycle / (layout.pp * round_s))
        prefill_stages = _stage_times(members, layout.pp, lambda s: s.prefill_s)
        prefills.append((m + layout.pp - 1) * max(prefill_stages))
    prefill_s = max(prefills)
    return SpeedPrediction(
        layout=layout, microbatches=m, ranks=speeds, decode_round_s=rounds, decode_tokens_per_s=tokens,
        prefill_s=prefill_s, prefill_tokens_per_s=work.batch * work.prompt_len / prefill_s,
        bubble=1 - min(busy_shares), busy_engines=busy, family_measured=measured, calibration=calibration)


def _stage_times(members: list[RankSpeed], stages: int, time_of) -> list[float]:
    """Each stage's time: its slowest rank (its tp and ep ranks wait for each other)."""
    out = [0.0] * stages
    for s in members:
        out[s.work.stage] = max(out[s.work.stage], time_of(s))
    return out


def _step_parts(w: RankWork, rates: Rates, host: HostTime, calibration: Calibration) -> dict[str, float]:
    reduce, send = calibration.all_reduce_in_step(w.group), calibration.send_in_step()
    parts = {
        "weights": rates.linear_seconds(w.weight_bytes, w.rows),
        "kv cache": rates.linear_seconds(w.kv_bytes, 1),
        "host": _host_s(w, host),
    }
    collectives = 0.0
    if reduce is not None:
        # An all-gather moves (ranks - 1)/ranks of its output into each rank: priced as an
        # all-reduce of the output, which moves about as much.
        collectives = w.all_reduces * reduce.seconds(w.all_reduce_bytes) + w.gathers * reduce.seconds(w.gather_bytes)
    return {
        **parts,
        "collectives": collectives,
        "sends": w.sends * send.seconds(w.send_bytes) if send is not None else 0.0,
    }


def _prefill_s(w: RankWork, work: Workload, rates: Rates, host: HostTime, calibration: Calibration) -> float:
    """One micro-batch's prompt through the stage: every prompt token a row of the linears."""
    rows = w.rows * work.prompt_len
    reduce, send = calibration.all_reduce_in_step(w.group), calibration.send_in_step()
    scale = work.prompt_len
    compute = rates.linear_seconds(w.weight_bytes, rows) + _host_s(w, host)
    collectives = 0.0 if reduce is None else (
        w.all_reduces * reduce.seconds(w.all_reduce_bytes * scale) + w.gathers * reduce.seconds(w.gather_bytes))
    sends = 0.0 if send is None else w.sends * send.seconds(w.send_bytes * scale)
    return compute + collectives + sends


def _host_s(w: RankWork, host: HostTime) -> float:
    """The stage's layers, the base model's work around them, and on the last stage the head."""
    return w.layers * host.per_layer_s + host.per_stage_s + (host.head_s if w.last else 0.0)


def _bytes_by_kind(model: PlannedModel, layout: Layout, rank: int, work: Workload) -> dict[str, int]:
    from ..models.parts import held_bytes

    stage_sizes = work.stage_sizes if work.stage_sizes and len(work.stage_sizes) == layout.pp else None
    return held_bytes(model.tensors.held(layout, rank, stage_sizes))


def _layer_collectives(s) -> tuple[int, int]:
    """All-reduces and all-gathers one decoder layer's tp rules make (mpbook.parallel.tensor)."""
    from ..parallel.tensor import GATHER_OUTPUT, ROWWISE

    reduces = gathers = 0
    for style in s.layer_rules.values():
        if style in ROWWISE or style in ("all_reduce", "moe_tp_experts"):
            reduces += 1
        elif style in GATHER_OUTPUT:
            gathers += 1
    return reduces, gathers


def _moe_layers(model: PlannedModel, layers: range) -> int:
    """How many of ``layers`` hold experts."""
    prefix = model.tensors.layer_prefix
    with_experts = {int(t.name[len(prefix):].split(".", 1)[0])
                    for layer in model.tensors.layers for t in layer if t.kind == "experts"}
    return sum(1 for i in layers if i in with_experts)


def _routed_share(config, tokens: int) -> float:
    """The share of a layer's experts that ``tokens`` tokens route to, if routing were uniform:
    1 - (1 - k/E)^tokens (k experts per token of E)."""
    text = config.get_text_config(decoder=True)
    experts = next((getattr(text, a) for a in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                    if isinstance(getattr(text, a, None), int)), None)
    per_token = next((getattr(text, a) for a in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token")
                      if isinstance(getattr(text, a, None), int)), None)
    if not experts or not per_token:
        return 1.0
    return 1 - (1 - min(per_token / experts, 1.0)) ** max(tokens, 1)


def arithmetic(p: SpeedPrediction) -> list[str]:
    """How the prediction is made, one line per distinct rank and one for the layout."""
    c = p.calibration
    rates = c.rates(p.busy_engines)
    group = max((r.work.group for r in p.ranks), default=1)
    reduce = c.all_reduce_in_step(group) if group > 1 else None
    lines = [
        f"rates with {p.busy_engines:.3g} of {c.engines_per_host} engines busy: "
        f"{rates.bandwidth_bytes_per_s / 1e9:.1f} GB/s at 1 row, "
        f"{rates.matmul_flops_per_s(ELEMENT_SIZE[c.dtype]) / 1e9:.0f} GFLOP/s at {max(rates.seconds_per_weight_byte)} rows"
        + (f"; all-reduce over {group} ranks {reduce.latency_s * 1e6:.0f} us + bytes at "
           f"{1 / max(reduce.seconds_per_byte, 1e-30) / 1e9:.2f} GB/s" if reduce is not None else "")
        + ("" if p.family_measured else f"; host time of {REFERENCE_FAMILY} (this family's not measured)")
    ]
    seen = set()
    for r in p.ranks:
        w = r.work
        key = (w.stage, w.last, round(w.weight_bytes), w.all_reduces, w.gathers, w.rows)
        if key in seen:
            continue
        seen.add(key)
        ms = {k: v * 1e3 for k, v in r.parts.items()}
        lines.append(
            f"rank {w.rank} (stage {w.stage}, {w.layers} layers, {w.rows} rows): weights {format_bytes(w.weight_bytes)} "
            f"{ms['weights']:.2f} ms + KV {format_bytes(w.kv_bytes)} {ms['kv cache']:.2f} ms + host {ms['host']:.2f} ms"
            + (f" + {w.all_reduces} all-reduces of {format_bytes(w.all_reduce_bytes)}"
               + (f" and {w.gathers} gathers of {format_bytes(w.gather_bytes)}" if w.gathers else "")
               + f" {ms['collectives']:.2f} ms" if w.all_reduces or w.gathers else "")
            + (f" + send {ms['sends']:.2f} ms" if w.sends else "")
            + f" = {r.step_s * 1e3:.2f} ms a step")
    if p.layout.pp > 1:
        lines.append(
            f"pipeline: {p.microbatches} micro-batch{'es' if p.microbatches != 1 else ''} over {p.layout.pp} stages, "
            f"a round = max(one way round, {p.microbatches} x the slowest stage) = {p.decode_round_s[0] * 1e3:.2f} ms; "
            f"stages idle {p.bubble:.0%}")
    lines.append(f"decode: {p.decode_tokens_per_s:,.0f} tok/s = rows / round, summed over "
                 f"{p.layout.dp} replica{'s' if p.layout.dp != 1 else ''}; {p.bound}")
    return lines

