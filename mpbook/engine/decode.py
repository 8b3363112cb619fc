"""Engine side of a run: one rank's share of the prompts through its part of the model.

Every rank runs the same loop. A rank holds one pipeline stage (all layers when pp=1),
tensor-parallel over its tp group when tp>1, and serves the prompts of its dp replica. The
replica's prompts are cut into micro-batches that flow through the stages: in GPipe
fill-drain order in the prefill (:func:`mpbook.parallel.pipeline.fill_drain`), and in decode
round-robin without draining between steps (:func:`mpbook.parallel.pipeline.interleaved`);
each micro-batch keeps its own KV cache on every stage.

The loop has small named parts, after gpt-fast: :func:`prefill` (every prompt token, the
first new token), :func:`decode_one_token` (one micro-batch one step further),
:func:`decode_n_tokens` (steps until every micro-batch has finished or the cap).

Who knows what, so that every rank agrees when a micro-batch ends without extra messages:
the last stage chooses each row's token (:mod:`mpbook.engine.choice`) and sees its own
stop test; with more than one stage it sends the tokens to the first stage (as it must, to
embed them) with one more element, how many rows go on, so the first stage runs no stop test
of its own; the stages between learn it from the one-element header of the activation they
receive. Tokens are chosen on one rank of the last stage and broadcast to the others of its
(ep, tp) group, except in greedy runs without expert parallel, where every rank of that
group holds the same logits (or the same all-gathered maxima of a vocab-parallel head) and
so chooses the same token by itself.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..compat.torch import TensorPeak
from ..parallel.data import replica_rows
from ..parallel.pipeline import fill_drain, interleaved
from ..protocol import RankOutput, Request
from ..units import split_evenly
from .choice import Stopper, TokenChooser, stop_string_criteria
from .runner import Runner, out_of_memory_reported, prepare
from .state import engine_mesh
from .steps import StepBreakdown
from .telemetry import device_memory
from .stream import TokenStream


class StepClock:
    """When each (stage, micro-batch) step ran, for the pipeline timeline.

    On a CPU the host clock is the device's. A GPU runs behind the host, so host readings
    would time kernel launches: CUDA events time the device's work instead, read once the
    run has synchronized, and are placed on the host clock from a first event recorded at start.
    """

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.steps: list[tuple] = []
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
            self.origin_host = time.perf_counter()

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def record(self, stage: int, microbatch: int, phase: str, began) -> None:
        self.steps.append((stage, microbatch, phase, began, self.now()))

    def report(self, telemetry) -> None:
        """Into telemetry's timeline (on a GPU, after the device has synchronized)."""
        for stage, microbatch, phase, began, ended in self.steps:
            if self.cuda:
                began = self.origin_host + self.origin.elapsed_time(began) / 1000
                ended = self.origin_host + self.origin.elapsed_time(ended) / 1000
            telemetry.event(stage, microbatch, phase, began, ended)
        self.steps.clear()


@dataclass
class MicroBatch:
    """One micro-batch of this rank's replica, as this rank sees it."""

    index: int
    prompts: list[int]  # each row's index in the request
    mask: Any  # attention mask, grown by one column per step
    positions: Any  # of the next input tokens
    cache: Any  # this stage's KV cache of these rows
    ids: Any = None  # the prompt ids (first stage: the input; last stage: the repetition penalty)
    chooser: TokenChooser | None = None  # last stage
    stopper: Stopper | None = None  # last stage (the first learns from the tokens it receives)
    next_tokens: Any = None  # last chosen (last stage; on a single stage, what it embeds next)
    generated: list = field(default_factory=list)  # per step: the rows' tokens (choosing rank)
    logits: list = field(default_factory=list)  # forward pass: per row (prompt_len, vocab)
    alive: bool = True
    # --compile: the mask over the static cache's whole length (unused columns 0), written in
    # place each step, how many of its columns are in use, and the runner's key of the cache.
    padded_mask: Any = None
    seen: int = 0
    static_key: tuple | None = None

    @property
    def rows(self) -> int:
        return len(self.prompts)


@dataclass
class Run:
    """What the parts of the loop share during one run on this rank."""

    runner: Runner
    request: Request
    telemetry: Any
    clock: StepClock
    stream: TokenStream | None
    reports: bool  # this rank chooses (and reports) its replica's tokens
    stage_group: Any  # the last stage's (ep, tp) group (a collectives.Group), or None when it is this rank alone
    independent: bool  # every rank of the last stage chooses the same token by itself
    steps: StepBreakdown  # where this rank's decode steps spend their time

    @property
    def peers(self):
        return self.runner.peers

    @property
    def generate(self) -> bool:
        return self.request.max_new_tokens > 0


def run(state, request: Request) -> RankOutput:
    """Prefill (and decode, unless ``max_new_tokens`` is 0) this rank's share of the prompts."""
    began = time.perf_counter()
    with out_of_memory_reported(state):
        output = _run(state, request)
    output.engine_seconds = time.perf_counter() - began
    return output


def _run(state, request: Request) -> RankOutput:
    import torch

    loaded = prepare(state, request)
    runner: Runner = state.cache["runner"]
    tel = state.telemetry
    layout, coords, peers = request.layout, runner.coords, runner.peers
    rows = replica_rows(len(request.input_ids), layout.dp, coords.dp)
    reports = peers.last and coords.tp == 0 and coords.ep == 0
    # Groups are made by every rank at the same point of every run (dist.new_group is a
    # collective step), before a replica without prompts returns.
    stage_group = _stage_group(state, layout)
    common = dict(
        rank=state.rank, coords=coords, stage=coords.pp, rows=rows, reports_tokens=reports,
        weight_bytes=runner.weight_bytes, load_seconds=loaded["load_seconds"], import_seconds=loaded["import_seconds"],
        host=socket.gethostname(),
    )
    if not rows:  # more replicas than prompts: this replica has nothing to do
        return _nothing_to_do(common, runner, tel, reports=reports)

    compiled = compiled_decode(runner, request) if request.compile and request.max_new_tokens > 1 else None
    microbatches = make_microbatches(state, runner, request, rows, reports, compiled=compiled)
    if runner.device.type == "cpu":
        from ..models import order_weights, unpack_weights

        # A decode step's few rows stream a weight faster packed for oneDNN, or at one row
        # stored column by column (models.weight_order). A forward pass alone carries rows x
        # prompt tokens, where either store is within 5%: it keeps the one the weights have,
        # and copies nothing. A run that counts tensors keeps them dense, where MemTracker
        # sees them, and so does a run that asks for dense weights.
        dense = request.track_tensors or request.dense_weights
        if request.max_new_tokens:
            order_weights(runner.model, rows=max(len(mb.prompts) for mb in microbatches), pack=not dense)
        elif dense:
            unpack_weights(runner.model)
    tracker = contextlib.nullcontext()
    if request.track_tensors:
        tracker = TensorPeak(runner.model, *(mb.mask for mb in microbatches), *(mb.ids for mb in microbatches))
    with torch.inference_mode(), tel.run() as stats, tracker:
        ctx = _new_run(runner, request, tel, microbatches, started=stats.started, reports=reports,
                       stage_group=stage_group)
        compile_seconds = _generate(ctx, microbatches, compiled)

    kv_bytes = _kv_cache_bytes(microbatches)
    tel.note_memory("kv_cache", kv_bytes)
    tokens, times, reasons = _reported_tokens(ctx, microbatches)
    return RankOutput(
        **common,
        tokens=tokens,
        logits=[row for mb in microbatches for row in mb.logits] if reports and not ctx.generate else None,
        prompt_tokens=sum(len(request.input_ids[p]) for p in rows),
        new_tokens=sum(len(t) for t in tokens) if tokens else 0,
        started=stats.started,
        phase_seconds=dict(stats.phase_seconds),
        collectives={kind: n for kind, n in stats.collectives.items() if n},
        collective_seconds=stats.collective_seconds,
        events=list(stats.events),
        peak_memory_bytes=stats.peak_memory_bytes,
        kv_cache_bytes=kv_bytes,
        tensor_peak_bytes=tracker.bytes if request.track_tensors else None,
        memory_free_bytes=device_memory(runner.device)[0],
        token_times=times,
        stop_reasons=reasons,
        expert_tokens=stats.expert_tokens,
        transports=transports(runner, stage_group),
        step_breakdown=ctx.steps.report(),
        compile_seconds=compile_seconds,
    )


def _stage_group(state, layout):
    """The last stage's (ep, tp) group of this rank (a collectives.Group), or None when this
    rank is alone in it. Made on every rank, whichever stage it holds (a collective step)."""
    stage_ranks = layout.group_ranks(("ep", "tp"), state.rank)
    if len(stage_ranks) == 1:
        return None
    from ..parallel.collectives import Group

    mesh = engine_mesh(state, layout)
    return Group(mesh.group("ep", "tp"), rank=stage_ranks.index(state.rank), size=len(stage_ranks),
                 ranks=stage_ranks, comm=mesh.comm("ep", "tp"))


def _nothing_to_do(common: dict, runner: Runner, tel, *, reports: bool) -> RankOutput:
    """The output of a replica without prompts (more replicas than prompts)."""
    with tel.run() as stats:
        pass
    return RankOutput(**common, tokens=[] if reports else None, logits=None, prompt_tokens=0, new_tokens=0,
                      started=stats.started, phase_seconds={}, collectives={}, collective_seconds=0.0,
                      events=[], peak_memory_bytes=stats.peak_memory_bytes, kv_cache_bytes=0,
                      memory_free_bytes=device_memory(runner.device)[0])


def _new_run(runner: Runner, request: Request, tel, microbatches: list[MicroBatch], *, started: float,
             reports: bool, stage_group) -> Run:
    """What the parts of the loop share: a token stream where this rank reports a replica's
    live tokens, and whether the last stage's ranks choose each token by themselves."""
    sampling = request.sampling
    greedy = not sampling.do_sample and sampling.repetition_penalty == 1.0
    stream = None
    if reports and request.stream and request.max_new_tokens:
        stream = TokenStream([p for mb in microbatches for p in mb.prompts], started=started)
    return Run(
        runner=runner, request=request, telemetry=tel, clock=StepClock(runner.device), stream=stream,
        reports=reports, stage_group=stage_group, independent=greedy and request.layout.ep == 1,
        steps=StepBreakdown(tel),
    )


def _generate(ctx: Run, microbatches: list[MicroBatch], compiled) -> float | None:
    """Compile (with ``compiled``), prefill and decode; the seconds compiling took, if it did."""
    import torch

    runner, tel = ctx.runner, ctx.telemetry
    compile_seconds = None
    tel.stream = ctx.stream
    try:
        if compiled is not None:
            with tel.phase_scope("compiling"), _routes_not_counted(runner, tel):
                compile_seconds = compiled.warm_up(microbatches, first=ctx.peers.first,
                                                   hidden_size=runner.hidden_size, dtype=runner.dtype)
        prefill(ctx, microbatches)
        if ctx.generate:
            decode_n_tokens(ctx, microbatches)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        ctx.clock.report(tel)
    finally:
        tel.stream = None
    return compile_seconds


@contextlib.contextmanager
def _routes_not_counted(runner: Runner, tel):
    """The compile warm-up's scratch steps go through the MoE layers too; their routes are no
    tokens of the run: the engine's routes counters and each layer's load are put back."""
    counts = [*tel.expert_counters(), *runner.expert_load.values()]
    kept = [count.clone() for count in counts]
    try:
        yield
    finally:
        for count, before in zip(counts, kept):
            count.copy_(before)


def _kv_cache_bytes(microbatches: list[MicroBatch]) -> int:
    return sum(
        t.numel() * t.element_size()
        for mb in microbatches
        for layer in mb.cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )


def _reported_tokens(ctx: Run, microbatches: list[MicroBatch]):
    """(tokens, their times, why each row stopped) of the rows this rank reports; Nones when it
    reports none or the run generated nothing."""
    if not (ctx.reports and ctx.generate):
        return None, None, None
    stream = ctx.stream
    tokens = [stream.tokens[p] if stream else [] for mb in microbatches for p in mb.prompts]
    times = [stream.times[p] if stream else [] for mb in microbatches for p in mb.prompts]
    reasons = [reason for mb in microbatches for reason in mb.stopper.reasons]
    if stream is None:  # streaming off: the same tokens from the steps kept
        tokens = [own_tokens(mb, r) for mb in microbatches for r in range(mb.rows)]
    return tokens, times, reasons


def compiled_decode(runner: Runner, request: Request):
    """This rank's compiled decode step (mpbook.engine.compiled), made once per loaded model."""
    from .compiled import CompiledDecode, check_compilable

    if runner.compiled is None:
        check_compilable(runner.stage, model=request.model)
        layout = request.layout
        runner.compiled = CompiledDecode(runner.stage, runner.device, collectives_inside=layout.tp > 1 or layout.ep > 1)
    return runner.compiled


def transports(runner: Runner, stage_group) -> dict[str, str]:
    """What each of this rank's groups moved its tensors over, by their dims."""
    out = {"+".join(dims): group.transport for dims, group in runner.groups}
    if runner.peers.stages > 1:
        out["pp"] = runner.peers.transport
    if stage_group is not None:
        out.setdefault("+".join(d for d in ("ep", "tp") if getattr(runner.key[1], d) > 1), stage_group.transport)
    return out


def make_microbatches(state, runner: Runner, request: Request, rows: range, reports: bool, *,
                      compiled=None) -> list[MicroBatch]:
    """This replica's prompts cut into micro-batches, each left-padded to its own longest prompt
    (and with ``compiled``, each with a static cache and a mask of the cache's length)."""
    peers = runner.peers
    criteria = None
    if request.stopping.stop_strings and request.max_new_tokens and peers.last:
        criteria = stop_criteria(state, request)
    out = []
    for j, part in enumerate(split_evenly(len(rows), request.microbatches)):
        prompts = [rows[i] for i in part]
        ids, mask = left_padded([request.input_ids[p] for p in prompts], request.pad_token_id, runner.device)
        # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if compiled is None:
            mb = MicroBatch(index=j, prompts=prompts, mask=mask, positions=positions, cache=runner.new_cache(),
                            ids=ids)
        else:
            from .compiled import cache_length

            length = cache_length(mask.shape[1], request.max_new_tokens)
            key, cache = compiled.cache(j, len(prompts), length)
            padded = mask.new_zeros(len(prompts), length)
            padded[:, : mask.shape[1]] = mask
            mb = MicroBatch(index=j, prompts=prompts, mask=mask, positions=positions, cache=cache, ids=ids,
                            padded_mask=padded, seen=mask.shape[1], static_key=key)
        if request.max_new_tokens and peers.last:
            mb.stopper = Stopper(request.stopping, pad_id=request.pad_token_id, prompt_ids=ids, attention_mask=mask,
                                 criteria=criteria)
        if request.max_new_tokens and peers.last:
            mb.chooser = TokenChooser(request.sampling, prompt_indices=prompts, prompt_ids=ids, attention_mask=mask,
                                      vocab_size=runner.vocab_size)
        out.append(mb)
    return out


# --------------------------------------------------------------------------- the parts
def prefill(ctx: Run, microbatches: list[MicroBatch]) -> None:
    """Every prompt token of every micro-batch through this stage, in fill-drain order; the
    last stage chooses each row's first new token (or, for a forward pass, keeps the logits)."""
    runner, peers, tel = ctx.runner, ctx.peers, ctx.telemetry
    tel.set_phase("prefill")

    def work(mb: MicroBatch) -> None:
        width = mb.mask.shape[1]
        x = mb.ids if peers.first else peers.recv_activation((mb.rows, width, runner.hidden_size), runner.dtype,
                                                             runner.device)
        began = ctx.clock.now()
        out = runner.forward(x, mb.mask, mb.positions, mb.cache, all_logits=not ctx.generate)
        # The bar ends with the stage's work, before the hand-over: the next stage may start
        # as soon as the send is on its way.
        ctx.clock.record(peers.index, mb.index, "prefill", began)
        if not peers.last:
            peers.send_activation(out)
        tel.add_tokens("prefill", int(mb.mask.sum()))
        if not peers.last:
            return
        if ctx.generate:
            take_tokens(ctx, mb, out[:, -1, :], more=ctx.request.max_new_tokens > 1)
        else:
            keep_logits(ctx, mb, out)

    fill_drain(microbatches, work, peers)
    if runner.device.type == "cuda":
        import torch

        torch.cuda.synchronize(runner.device)  # the prefill's time is the device's, not the launches'


def decode_one_token(ctx: Run, mb: MicroBatch, step: int) -> None:
    """Micro-batch ``mb`` one token further on this stage (step ``step`` of the decode)."""
    with ctx.steps.step(first=step == 1):
        _decode_one_token(ctx, mb, step)


def _decode_one_token(ctx: Run, mb: MicroBatch, step: int) -> None:
    runner, peers, tel = ctx.runner, ctx.peers, ctx.telemetry
    # The step's mask and positions first: they need nothing from the other stages, so on a
    # stage that waits below their time hides in the wait (a decode step's host work right
    # after a forward pass runs on cold caches: several times its cost in a loop).
    forward = _one_position_more(runner, mb)
    if peers.first and peers.last:
        x = None if mb.stopper.all_finished else mb.next_tokens[:, None]
    elif peers.first:  # the last stage's choice, and whether any row goes on: no stop test here
        x = peers.recv_tokens(mb.rows, runner.device)
        x = None if x is None else x[:, None]
    else:
        x = peers.recv_step(mb.rows, runner.hidden_size, runner.dtype, runner.device)
    if x is None:  # every row of the micro-batch has finished (here, or on the stages before)
        end_microbatch(ctx, mb)
        return
    began = ctx.clock.now()
    with ctx.steps.part("forward"):
        out = forward(x)
    ctx.clock.record(peers.index, mb.index, "decode", began)
    if not peers.last:
        peers.send_step(out, rows=mb.rows, hidden=runner.hidden_size, dtype=runner.dtype, device=runner.device)
    else:
        with ctx.steps.part("choice"):
            active = take_tokens(ctx, mb, out[:, -1, :], more=step < ctx.request.max_new_tokens - 1)
        tel.add_tokens("decode", active)


def _one_position_more(runner: Runner, mb: MicroBatch):
    """Grow ``mb``'s mask and positions by the token this step adds; return the step's forward."""
    import torch

    mb.positions = mb.positions[:, -1:] + 1
    if mb.padded_mask is not None:  # --compile: the same shapes every step
        mb.padded_mask[:, mb.seen] = 1
        mb.seen += 1
        return lambda x: runner.compiled.step(x, mb.padded_mask, mb.positions, mb.cache)
    mb.mask = torch.cat([mb.mask, mb.mask.new_ones(mb.rows, 1)], dim=1)
    return lambda x: runner.forward(x, mb.mask, mb.positions, mb.cache, all_logits=False)


def decode_n_tokens(ctx: Run, microbatches: list[MicroBatch]) -> None:
    """Decode steps until every micro-batch has finished or the cap: the micro-batches take
    turns on every stage, and none waits for the others at a step's end (pipeline.interleaved)."""
    ctx.telemetry.set_phase("decode")
    interleaved(microbatches, range(1, ctx.request.max_new_tokens), lambda mb, step: decode_one_token(ctx, mb, step),
                ctx.peers)


def end_microbatch(ctx: Run, mb: MicroBatch) -> None:
    """Every row of ``mb`` has finished: tell the next stage (in place of the activation)."""
    mb.alive = False
    runner, peers = ctx.runner, ctx.peers
    if not peers.last:
        peers.send_step(None, rows=mb.rows, hidden=runner.hidden_size, dtype=runner.dtype, device=runner.device)


# --------------------------------------------------------------------------- token choice
def take_tokens(ctx: Run, mb: MicroBatch, logits, *, more: bool) -> int:
    """On the last stage: choose the rows' next tokens, apply the stop test, stream them, and
    hand them to the first stage when another step follows; returns how many rows were still
    going (their tokens count).

    What a step asks of the host beyond the forward pass, on a GPU too: the rows still going
    (one small copy), and, on the rank that reports, the chosen tokens (for the live text and
    the stop strings). Everything else stays on the device."""
    active = (~mb.stopper.finished).tolist()
    tokens = mb.stopper.update(choose(ctx, mb, logits))
    if more and not ctx.peers.first:  # before the bookkeeping below: the first stage is waiting for them
        ctx.peers.send_tokens(tokens, going=~mb.stopper.finished)
    mb.chooser.update(tokens)
    mb.next_tokens = tokens
    if ctx.reports:
        mb.generated.append(tokens)
        if ctx.stream is not None:
            ctx.stream.add(mb.prompts, tokens.tolist(), active)
    return sum(active)


def choose(ctx: Run, mb: MicroBatch, logits):
    """One token per row from this stage's logits (a vocabulary slice when the head is
    vocab-parallel), the same on every rank of the last stage's (ep, tp) group."""
    import torch

    runner, tel = ctx.runner, ctx.telemetry
    vocab = runner.vocab
    if ctx.independent:
        if vocab is None:
            return mb.chooser.choose(logits)
        from ..parallel.vocab import greedy_tokens  # an all-gather of each slice's (max, index)

        with tel.timed_collective("all_gather"):
            return greedy_tokens(logits, vocab)
    if vocab is not None:
        from ..parallel.vocab import gather_logits  # the whole vocabulary on the choosing rank only

        with tel.timed_collective("gather"):
            logits = gather_logits(logits, vocab)  # None on all but the tp group's first rank
    if ctx.stage_group is None:
        return mb.chooser.choose(logits)
    # One rank chooses; the others receive its tokens (never sample separately per rank).
    group = ctx.stage_group
    tokens = mb.chooser.choose(logits) if group.rank == 0 else torch.empty(mb.rows, dtype=torch.long,
                                                                            device=runner.device)
    with tel.timed_collective("broadcast"):
        group.broadcast(tokens, src=0)
    return tokens


def keep_logits(ctx: Run, mb: MicroBatch, logits) -> None:
    """A forward pass: each row's logits over its own (unpadded) positions, on the reporting rank."""
    vocab = ctx.runner.vocab
    if vocab is not None:
        from ..parallel.vocab import gather_logits

        with ctx.telemetry.timed_collective("gather"):
            logits = gather_logits(logits, vocab)  # None on all but the tp group's first rank
    if ctx.reports:
        for r in range(mb.rows):
            mb.logits.append(logits[r, -int(mb.mask[r].sum()):].float().cpu())


# --------------------------------------------------------------------------- helpers
def own_tokens(mb: MicroBatch, row: int) -> list[int]:
    """Row ``row``'s new tokens up to and including its finishing one (no padding after it)."""
    steps = [int(step[row]) for step in mb.generated]
    return steps[: int(mb.stopper.lengths[row])]


def stop_criteria(state, request: Request):
    """transformers' StopStringCriteria for the request's stop strings, built once per model
    and strings on this engine (it walks the vocabulary) and kept."""
    key = ("stop", request.model, request.stopping.stop_strings)
    if key not in state.cache:
        from ..models import load_tokenizer

        state.cache[key] = stop_string_criteria(load_tokenizer(request.model), request.stopping.stop_strings)
    return state.cache[key]


def left_padded(rows: list, pad_id: int, device):
    """Token ids of several prompts as one left-padded batch, and its attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)
