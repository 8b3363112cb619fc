"""Engine side of a run: one rank's share of the prompts through its part of the model.

Every rank runs the same loop. A rank holds one pipeline stage (all layers when pp=1),
tensor-parallel over its tp group when tp>1, and serves the prompts of its dp replica.
Within a replica the prompts are cut into micro-batches that flow through the stages in
GPipe fill-drain order, in the prefill and in every decode step; each micro-batch keeps its
own KV cache on every stage.
"""

from __future__ import annotations

import contextlib
import time

from ..compat.torch import TensorPeak
from ..parallel.data import replica_rows
from ..protocol import RankOutput, Request
from ..units import split_evenly
from .runner import Runner, _out_of_memory_reported, _prepare


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


def run(state, request: Request) -> RankOutput:
    """Prefill (and decode, unless ``max_new_tokens`` is 0) this rank's share of the prompts."""
    with _out_of_memory_reported(state):
        return _run(state, request)


def _run(state, request: Request) -> RankOutput:
    import torch
    from transformers import DynamicCache

    loaded = _prepare(state, request)
    runner: Runner = state.cache["runner"]
    tel = state.telemetry
    layout, coords, peers = request.layout, runner.coords, runner.peers
    rows = replica_rows(len(request.input_ids), layout.dp, coords.dp)
    reports = peers.last and coords.tp == 0 and coords.ep == 0
    empty = dict(
        rank=state.rank, coords=coords, stage=coords.pp, rows=rows, reports_tokens=reports,
        weight_bytes=runner.weight_bytes, load_seconds=loaded["load_seconds"],
    )
    if not rows:  # more replicas than prompts: this replica has nothing to do
        with tel.run() as stats:
            pass
        return RankOutput(**empty, tokens=[] if reports else None, logits=None, prompt_tokens=0, new_tokens=0,
                          started=stats.started, phase_seconds={}, collectives={}, collective_seconds=0.0,
                          events=[], peak_memory_bytes=stats.peak_memory_bytes, kv_cache_bytes=0,
                          memory_free_bytes=free_memory_bytes(device))

    device = runner.device
    ids, masks_all = left_padded([request.input_ids[i] for i in rows], request.pad_token_id, device)
    hidden_size = runner.stage.config.hidden_size
    microbatches = split_evenly(len(rows), request.microbatches)
    generate = request.max_new_tokens > 0
    pad_id = request.pad_token_id
    eos = torch.tensor(list(request.stopping.eos_token_ids) or [-1], device=device)

    masks = [masks_all[mb.start:mb.stop] for mb in microbatches]
    # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
    positions = [(m.long().cumsum(-1) - 1).masked_fill(m == 0, 1) for m in masks]
    caches = [DynamicCache(config=runner.stage.config) for _ in microbatches]
    next_tokens: list = [None] * len(microbatches)
    finished = [torch.zeros(len(mb), dtype=torch.bool, device=device) for mb in microbatches]
    generated: list[list] = [[] for _ in microbatches]
    logits_out: list = []
    prompt_tokens = int(masks_all.sum())

    clock = StepClock(device)

    def step(j: int, x, phase: str, all_logits: bool = False):
        """Run micro-batch j through this stage; returns the last stage's logits."""
        began = clock.now()
        out = runner.forward(x, masks[j], positions[j], caches[j], all_logits=all_logits)
        if not peers.last:
            peers.send_activation(out)
        clock.record(coords.pp, j, phase, began)
        return out

    def take_tokens(j: int, logits) -> None:
        token = logits[:, -1, :].argmax(-1)
        token = torch.where(finished[j], torch.full_like(token, pad_id), token)
        finished[j] |= torch.isin(token, eos)
        generated[j].append(token)
        next_tokens[j] = token

    tracker = TensorPeak(runner.stage, ids, masks_all) if request.track_tensors else contextlib.nullcontext()
    with torch.inference_mode(), tel.run() as stats, tracker:
        tel.set_phase("prefill")
        for j, mb in enumerate(microbatches):
            x = ids[mb.start:mb.stop] if peers.first else peers.recv_activation(
                (len(mb), ids.shape[1], hidden_size), runner.dtype, device)
            out = step(j, x, "prefill", all_logits=not generate)
            tel.add_tokens("prefill", int(masks[j].sum()))
            if peers.last:
                if generate:
                    take_tokens(j, out)
                    if not peers.first and request.max_new_tokens > 1:
                        peers.send_tokens(next_tokens[j])
                else:
                    logits_out.extend(
                        out[r, -int(masks[j][r].sum()):].float().cpu() for r in range(len(mb))
                    )
        peers.flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the prefill's time is the device's, not the launches'

        if generate:
            tel.set_phase("decode")
        for step_index in range(1, request.max_new_tokens):
            for j, mb in enumerate(microbatches):
                masks[j] = torch.cat([masks[j], masks[j].new_ones(len(mb), 1)], dim=1)
                positions[j] = positions[j][:, -1:] + 1
                if peers.first:
                    token = next_tokens[j] if peers.last else peers.recv_tokens(len(mb), device)
                    x = token[:, None]
                else:
                    x = peers.recv_activation((len(mb), 1, hidden_size), runner.dtype, device)
                out = step(j, x, "decode")
                tel.add_tokens("decode", len(mb))
                if peers.last:
                    take_tokens(j, out)
                    if not peers.first and step_index < request.max_new_tokens - 1:
                        peers.send_tokens(next_tokens[j])
            peers.flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock.report(tel)

    tokens = None
    if reports and generate:
        tokens = [row.tolist() for j in range(len(microbatches)) for row in torch.stack(generated[j], dim=1)]
    kv_bytes = sum(
        t.numel() * t.element_size()
        for cache in caches
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )
    tel.note_memory("kv_cache", kv_bytes)
    tensor_peak = None
    if request.track_tensors:
        tensor_peak = tracker.bytes
    return RankOutput(
        **empty,
        tokens=tokens,
        logits=logits_out if reports and not generate else None,
        prompt_tokens=prompt_tokens,
        new_tokens=len(rows) * request.max_new_tokens,
        started=stats.started,
        phase_seconds=dict(stats.phase_seconds),
        collectives={kind: n for kind, n in stats.collectives.items() if n},
        collective_seconds=stats.collective_seconds,
        events=list(stats.events),
        peak_memory_bytes=stats.peak_memory_bytes,
        kv_cache_bytes=kv_bytes,
        tensor_peak_bytes=tensor_peak,
        memory_free_bytes=free_memory_bytes(device),
    )


def free_memory_bytes(device) -> int:
    """What the device has free now (a CPU engine: the host's available memory)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)
