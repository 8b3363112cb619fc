"""Engine side of inference: one rank's part of a (dp, pp, tp) layout, and the loop that runs it.

Every rank runs the same loop. A rank holds one pipeline stage (all layers when pp=1),
tensor-parallel over its tp group when tp>1, and serves the prompts of its dp replica.
Within a replica the prompts are cut into micro-batches that flow through the stages in
GPipe fill-drain order, in the prefill and in every decode step; each micro-batch keeps its
own KV cache on every stage.

Generation is greedy and always runs ``max_new_tokens`` steps; a row that has produced an
end-of-sequence token continues with padding, exactly as ``transformers``' ``generate``
fills finished rows. (Stopping early would need every stage to learn that all rows are done,
one more message per step; a fixed length also keeps throughput comparable across layouts.)
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .mesh import Coords, Layout, Mesh
from .parallel.data import split_batch
from .parallel.pipeline import StagePeers, split_layers
from .telemetry import Event, TensorBytes

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
# Names a person may type for a dtype -> torch's name for it.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class Request:
    """What every rank needs to know about one run; sent whole to every engine."""

    model: str
    layout: Layout
    prompts: tuple[str, ...]
    max_new_tokens: int  # 0: a forward pass only, returning logits
    microbatches: int = 1
    dtype: str = "float32"
    stage_sizes: tuple[int, ...] | None = None
    # Track every tensor's bytes through the run (torch's MemTracker): the peak of weights,
    # KV cache and activations alone, comparable with the planner on CPU engines too, where
    # the process peak includes the Python runtime. Slows the run; off by default.
    track_tensors: bool = False

    @property
    def model_key(self) -> tuple:
        """Runs with the same key reuse the loaded model."""
        return (self.model, self.layout, self.stage_sizes, self.dtype)


@dataclass
class RankOutput:
    """One rank's report of a run; the client merges these into the result."""

    rank: int
    coords: Coords
    stage: int
    rows: range  # indices of the prompts this rank's replica served
    reports_tokens: bool  # the last stage's tp-rank 0 of each replica speaks for it
    tokens: list[list[int]] | None
    logits: list[Any] | None  # forward pass: one (prompt_len, vocab) tensor per prompt
    prompt_tokens: int
    new_tokens: int
    started: float
    phase_seconds: dict[str, float]
    collectives: dict[str, int]
    collective_seconds: float
    events: list[Event]
    peak_memory_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    tensor_peak_bytes: int | None = None


@dataclass
class Runner:
    """This rank's stage of a layout, kept on the engine between runs."""

    key: tuple
    stage: Any  # the causal LM holding this rank's layers
    tokenizer: Any
    peers: StagePeers
    coords: Coords
    mesh: Mesh | None
    device: Any
    dtype: Any
    weight_bytes: int
    load_seconds: float
    eos_ids: list[int] = field(default_factory=list)
    whole: bool = False  # an architecture mpbook cannot cut: the whole model, data parallel only

    def forward(self, x, attention_mask, position_ids, cache, *, all_logits: bool):
        """One stage forward: token ids (first stage) or hidden states in; hidden states or
        logits (last stage) out."""
        if self.whole:
            out = self.stage(input_ids=x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             use_cache=True, logits_to_keep=0 if all_logits else 1)
            return out.logits
        body = self.stage.model
        inputs = {"input_ids": x} if self.peers.first else {"inputs_embeds": x}
        hidden = body(**inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        hidden = hidden.last_hidden_state
        if not self.peers.last:
            return hidden
        # Generation needs only the last position's logits (what transformers does too).
        return self.stage.lm_head(hidden if all_logits else hidden[:, -1:, :])

    def close(self) -> None:
        self.stage = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


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


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def param_bytes(module) -> int:
    """Bytes of the parameters this rank holds (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _build_runner(state, request: Request) -> Runner:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from . import models
    from .parallel import tensor

    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    layout = request.layout
    coords = layout.coords(state.rank)
    config = AutoConfig.from_pretrained(models.resolve(request.model))
    whole = "pipeline" not in models.supported_strategies(config)
    if whole:
        stage = models.load_whole(request.model, dtype=torch_dtype(request.dtype), device=state.device)
    else:
        stages = split_layers(config.num_hidden_layers, layout.pp, request.stage_sizes)
        stage = models.load_stage(
            request.model,
            layers=stages[coords.pp],
            first=coords.pp == 0,
            last=coords.pp == layout.pp - 1,
            dtype=torch_dtype(request.dtype),
            device=state.device,
            tp_rank=coords.tp,
            tp=layout.tp,
        )
    mesh = None
    if layout.tp > 1:
        # One mesh per layout for the engine's lifetime: its subgroups are made once (a
        # collective step) and reused when a later run comes back to the same layout.
        meshes = state.cache.setdefault("meshes", {})
        mesh = meshes.get(layout) or meshes.setdefault(layout, Mesh(layout, state.rank, state.device.type))
        tensor.connect(stage, mesh["tp"].get_group(), state.telemetry)
    tokenizer = models.load_tokenizer(request.model)
    eos = stage.generation_config.eos_token_id if stage.generation_config is not None else None
    if eos is None:
        eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return Runner(
        key=request.model_key,
        stage=stage,
        tokenizer=tokenizer,
        peers=StagePeers(layout.group_ranks("pp", state.rank), coords.pp, state.telemetry),
        coords=coords,
        mesh=mesh,
        device=state.device,
        dtype=torch_dtype(request.dtype),
        weight_bytes=param_bytes(stage),
        load_seconds=time.perf_counter() - began,
        eos_ids=eos_ids,
        whole=whole,
    )


class DeviceOutOfMemory(RuntimeError):
    """A device ran out of memory on this rank; the engine freed what it could and stays up."""


@contextlib.contextmanager
def _out_of_memory_reported(state) -> Iterator[None]:
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
        runner = state.cache.pop("runner", None)
        if runner is not None:
            runner.close()  # free this rank's model: the next run reloads it
        del exc  # its traceback holds the frames, and they hold the tensors
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(state.device)
        gib = 1024**3
        raise DeviceOutOfMemory(
            f"out of memory on rank {state.rank} ({state.device}): asked for {asked.group(1) if asked else 'more'}, "
            f"{free / gib:.2f} GiB free of {total / gib:.2f} GiB"
        ) from None


def prepare(state, request: Request) -> dict:
    """Load this rank's part of the model for ``request``'s layout, unless already loaded."""
    with _out_of_memory_reported(state):
        return _prepare(state, request)


def _prepare(state, request: Request) -> dict:
    runner = state.cache.get("runner")
    if runner is not None and runner.key == request.model_key:
        return {"weight_bytes": runner.weight_bytes, "load_seconds": 0.0, "reused": True}
    if runner is not None:
        state.cache.pop("runner").close()  # free the old layout's memory before loading
    with state.telemetry.phase_scope("loading"):
        runner = state.cache["runner"] = _build_runner(state, request)
    # The ranks of one replica (its stages and shards) work on the same tokens: the
    # dashboard counts each replica's tokens once.
    state.telemetry.replica = runner.coords.dp
    state.telemetry.note_memory("weights", runner.weight_bytes)
    return {"weight_bytes": runner.weight_bytes, "load_seconds": runner.load_seconds, "reused": False}


def run(state, request: Request) -> RankOutput:
    """Prefill (and decode, unless ``max_new_tokens`` is 0) this rank's share of the prompts."""
    with _out_of_memory_reported(state):
        return _run(state, request)


def _run(state, request: Request) -> RankOutput:
    import torch
    from transformers import DynamicCache

    _prepare(state, request)
    runner: Runner = state.cache["runner"]
    tel = state.telemetry
    layout, coords, peers = request.layout, runner.coords, runner.peers
    rows = split_batch(len(request.prompts), layout.dp)[coords.dp]
    reports = peers.last and coords.tp == 0
    empty = dict(
        rank=state.rank, coords=coords, stage=coords.pp, rows=rows, reports_tokens=reports,
        weight_bytes=runner.weight_bytes,
    )
    if not rows:  # more replicas than prompts: this replica has nothing to do
        with tel.run() as stats:
            pass
        return RankOutput(**empty, tokens=[] if reports else None, logits=None, prompt_tokens=0, new_tokens=0,
                          started=stats.started, phase_seconds={}, collectives={}, collective_seconds=0.0,
                          events=[], peak_memory_bytes=stats.peak_memory_bytes, kv_cache_bytes=0)

    device = runner.device
    batch = runner.tokenizer([request.prompts[i] for i in rows], padding=True, return_tensors="pt")
    ids = batch.input_ids.to(device)
    masks_all = batch.attention_mask.to(device)
    hidden_size = runner.stage.config.hidden_size
    microbatches = split_batch(len(rows), request.microbatches)
    generate = request.max_new_tokens > 0
    pad_id = runner.tokenizer.pad_token_id
    eos = torch.tensor(runner.eos_ids or [-1], device=device)

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

    tracker = contextlib.nullcontext()
    if request.track_tensors:
        tracker = TensorBytes()
        tracker.track(runner.stage, ids, masks_all)  # what exists before the run
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
        tensor_peak = tracker.peak
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
    )
