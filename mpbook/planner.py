"""Will it fit? Per-rank memory of a (dp, pp, tp) layout, predicted before anything loads.

Weights are read off the model's real module tree, built on the meta device (shapes and
dtypes, no memory), and cut exactly as the strategies cut it: contiguous decoder layers per
pipeline stage (:func:`mpbook.parallel.pipeline.split_layers`), the embedding on the first
stage, the final norm and LM head on the last, and inside each layer the projections of
:data:`mpbook.parallel.tensor.LAYER_PLAN` split over the tensor-parallel ranks. So a model
with biases, untied embeddings or an explicit head_dim is counted as it is, not by formula.
The KV cache and the activations follow from the shapes of the workload.

>>> p = plan("tiny", pp=2, tp=2, batch=4, prompt_len=32, max_new_tokens=16)  # doctest: +SKIP
>>> print(p)                                                                  # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import MpbookError
from .layout import Layout
from .protocol import DTYPE_CHOICES, DTYPES
from .units import split_evenly as split_batch

# "sdpa" is what mpbook's loader asks transformers for; "eager" materializes the scores.
ATTENTION = ("sdpa", "eager")
LOGITS_BYTES = 4  # logits are counted in float32, the precision sampling reads them in


# --------------------------------------------------------------------------- model structure
@dataclass(frozen=True)
class _Tensor:
    """One parameter or buffer: its shape, and the dimension tensor parallelism cuts (if any)."""

    key: int  # identity of the tensor, so that a tied matrix held twice is counted once
    shape: tuple[int, ...]
    element_size: int
    split_dim: int | None
    buffer: bool

    def local_bytes(self, tp: int, tp_rank: int) -> int:
        shape = list(self.shape)
        if self.split_dim is not None and tp > 1:
            # DTensor's Shard places torch.chunk pieces: ceil-sized, the last ones smaller.
            n = shape[self.split_dim]
            chunk = -(-n // tp)
            shape[self.split_dim] = max(0, min(chunk, n - tp_rank * chunk))
        return math.prod(shape) * self.element_size


@dataclass(frozen=True)
class _Structure:
    """The model's tensors grouped the way the strategies place them."""

    label: str
    architecture: str
    config: Any
    dtype: str
    embedding: tuple[_Tensor, ...]
    layers: tuple[tuple[_Tensor, ...], ...]
    final_norm: tuple[_Tensor, ...]
    head: tuple[_Tensor, ...]
    every_stage: tuple[_Tensor, ...]  # rotary embedding buffers
    tied: bool


def _tensors(module, split: dict[str, int | None] | None = None) -> list[_Tensor]:
    out = []
    for kind, items in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in items:
            out.append(
                _Tensor(
                    key=id(t),
                    shape=tuple(t.shape),
                    element_size=t.element_size(),
                    split_dim=(split or {}).get(name),
                    buffer=kind == "buffer",
                )
            )
    return out


def _layer_splits(layer, architecture: str) -> dict[str, int | None]:
    """Parameter name inside one decoder layer -> the dimension tp cuts (nn.Linear is out x in)."""
    from .parallel.tensor import LAYER_PLAN

    splits: dict[str, int | None] = {}
    for path, style in LAYER_PLAN.items():
        try:
            sub = layer.get_submodule(path)
        except AttributeError:
            raise MpbookError(
                f"{architecture}: its decoder layers have no {path}, which the tensor-parallel plan splits; "
                "mpbook plans Llama-family models (Llama, Mistral, Qwen2, SmolLM)"
            ) from None
        for name, _ in sub.named_parameters(recurse=False):
            if style == "colwise":  # output rows of the weight, and the bias with them
                splits[f"{path}.{name}"] = 0
            elif name == "weight":  # rowwise: input columns; the bias is added once, replicated
                splits[f"{path}.{name}"] = 1
    return splits


def _structure(model, dtype: str, label: str) -> _Structure:
    """Group the tensors of ``model`` (built on meta) into embedding, layers, norm, head."""
    architecture = type(model).__name__
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    needed = {"embed_tokens": base, "layers": base, "norm": base, "lm_head": model}
    for attr, owner in needed.items():
        if owner is None or getattr(owner, attr, None) is None:
            raise MpbookError(
                f"{architecture} has no {attr}: mpbook plans Llama-family causal LMs "
                "(model.embed_tokens, model.layers, model.norm, lm_head)"
            )
    layers = tuple(tuple(_tensors(layer, split=_layer_splits(layer, architecture))) for layer in base.layers)
    rotary = getattr(base, "rotary_emb", None)
    s = _Structure(
        label=label,
        architecture=architecture,
        config=model.config,
        dtype=dtype,
        embedding=tuple(_tensors(base.embed_tokens)),
        layers=layers,
        final_norm=tuple(_tensors(base.norm)),
        head=tuple(_tensors(model.lm_head)),
        every_stage=tuple(_tensors(rotary)) if rotary is not None else (),
        tied=model.lm_head.weight is base.embed_tokens.weight,
    )
    # Every tensor of the model must have a place, or the plan would silently miss memory.
    placed = {t.key for group in (s.embedding, s.final_norm, s.head, s.every_stage, *s.layers) for t in group}
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in placed]
    if stray:
        raise MpbookError(
            f"{architecture} holds {', '.join(stray[:3])} outside the embedding, decoder layers, final norm "
            "and LM head; mpbook plans Llama-family causal LMs only"
        )
    return s


def _meta_model(config, torch_dtype):
    """The model's module tree with every tensor on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except (ValueError, KeyError) as exc:
        raise MpbookError(
            f"transformers has no causal LM for model_type {getattr(config, 'model_type', '?')!r} ({exc}); "
            "give a Llama-family config"
        ) from None


# --------------------------------------------------------------------------- the workload
@dataclass(frozen=True)
class Workload:
    """What runs on the layout: prompts, lengths, precision, attention kernel."""

    batch: int
    prompt_len: int
    max_new_tokens: int
    microbatches: int
    dtype: str
    attention: str
    stage_sizes: tuple[int, ...] | None = None

    @property
    def tokens(self) -> int:
        """Positions a row's KV cache holds at the end: the prompt and every new token but
        the last, which is returned and never fed back (``max_new_tokens - 1`` decode steps)."""
        return self.prompt_len + max(self.max_new_tokens - 1, 0)


def _dims(config) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def _cached_tokens(config, layers: range, work: Workload) -> list[int]:
    """Tokens each layer's cache holds at its largest, as transformers' DynamicCache keeps them.

    A sliding-window layer keeps the last ``window - 1`` tokens as a view of the step's
    full tensor, so after the prefill its storage is the whole prompt, and after a decode
    step at most ``window`` tokens.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    out = []
    for i in layers:
        window = kwargs[i].get("sliding_window")
        if types[i] == "dummy":
            out.append(0)
        elif window:
            out.append(min(work.tokens, max(work.prompt_len, window)))
        else:
            out.append(work.tokens)
    return out


def _local(n: int, tp: int, tp_rank: int) -> int:
    chunk = -(-n // tp)
    return max(0, min(chunk, n - tp_rank * chunk))


# --------------------------------------------------------------------------- one rank
@dataclass(frozen=True)
class Device:
    """Where a rank runs and how much memory it may take."""

    name: str  # "cuda:0", "cpu", or "given"
    host: str
    free_bytes: int
    shared: bool = False  # CPU engines on one host draw on one pool of memory


@dataclass(frozen=True)
class RankPlan:
    """Predicted bytes of one rank; ``total`` is its peak: weights + KV cache + activations."""

    rank: int
    dp: int
    pp: int
    tp: int
    layers: range
    rows: int  # prompts of this rank's data-parallel replica
    microbatch_rows: int  # rows of the largest micro-batch
    parameters: int
    buffers: int
    kv_cache: int
    activations: int
    weight_parts: dict[str, int] = field(repr=False)
    kv_formula: str = field(repr=False)
    activation_parts: dict[str, int] = field(repr=False)
    activation_phase: str = field(repr=False)
    device: Device | None = None
    fits: bool | None = None

    @property
    def weights(self) -> int:
        return self.parameters + self.buffers

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def _activations(s: _Structure, work: Workload, *, rows: int, mb: int, cached: list[int],
                 tp: int, tp_rank: int, last: bool, pp: int) -> tuple[str, dict[str, int]]:
    """The larger of the prefill and the largest decode step of one micro-batch on this rank."""
    d = _dims(s.config)
    e = _element_size(work.dtype)
    h, hd = d["hidden"], d["head_dim"]
    heads, kvh = _local(d["heads"], tp, tp_rank), _local(d["kv_heads"], tp, tp_rank)
    inter = _local(d["intermediate"], tp, tp_rank)
    eager = work.attention == "eager"
    generate = work.max_new_tokens > 0
    phases = {}
    steps = [("prefill", work.prompt_len, work.prompt_len)]
    if generate:
        steps.append(("decode", 1, max(cached) if cached else work.tokens))
    for phase, q, k in steps:
        parts = {
            # the stage input (kept by the model's forward), the residual, and its normed copy
            "hidden states": 3 * mb * q * h * e,
            "mask": mb * q * k * (e if eager else 1),  # 4-D: additive floats (eager) or booleans
            "rotary cos/sin": 2 * mb * q * hd * e,
        }
        query = mb * q * heads * hd * e
        # Grouped-query attention: eager repeats k and v to every query head; sdpa does so
        # only for a masked prefill (a decode step folds the groups into the query instead).
        repeats = heads != kvh and (eager or q > 1)
        repeated = 2 * mb * heads * k * hd * e if repeats else 0
        # Eager scores: their float32 softmax, and (below float32) its cast back, while the
        # scores themselves are still referenced.
        scores = mb * heads * q * k * (e + 4 + (e if e != 4 else 0)) if eager else 0
        attention = query + repeated + max(scores, 2 * query)  # or: the output and its contiguous copy
        if phase == "decode":
            # torch.cat grows a layer's cache: the old k (then v) still exists beside the new one
            attention = max(attention, mb * kvh * k * hd * e)
        mlp = 3 * mb * q * inter * e  # act(gate), up, and their product
        if attention >= mlp:
            parts["attention (q, repeated k/v, scores)" if eager else "attention (q, repeated k/v, output)"] = attention
        else:
            parts["MLP (3 x rows x tokens x intermediate/tp)"] = mlp
        if last:
            # The LM head: generation keeps the last position of a micro-batch; a forward
            # pass returns every position of every row of the replica.
            logits = mb * 1 * d["vocab"] * LOGITS_BYTES if generate else rows * q * d["vocab"] * LOGITS_BYTES
            head = 2 * mb * q * h * e + logits
            layer_peak = sum(parts.values())
            if head > layer_peak:
                parts = {"hidden states": 2 * mb * q * h * e, "logits": logits}
        elif pp > 1 and rows > mb:
            # isend keeps each earlier micro-batch's output alive until the step's flush
            parts["sends in flight"] = (rows - mb) * q * h * e
        phases[phase] = parts
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return phase, phases[phase]


def _element_size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _rank_plans(s: _Structure, layout: Layout, work: Workload) -> list[RankPlan]:
    from .parallel.pipeline import split_layers

    stages = split_layers(len(s.layers), layout.pp, work.stage_sizes)
    replicas = split_batch(work.batch, layout.dp)
    d = _dims(s.config)
    e = _element_size(work.dtype)
    out = []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        layers = stages[c.pp]
        first, last = c.pp == 0, c.pp == layout.pp - 1
        rows = len(replicas[c.dp])
        mb = max((len(r) for r in split_batch(rows, work.microbatches)), default=0)

        seen: set[int] = set()
        parts: dict[str, int] = {}
        params = buffers = 0

        def hold(label: str, tensors) -> None:
            nonlocal params, buffers
            total = 0
            for t in tensors:
                if t.key in seen:  # a tied LM head on the embedding's stage: one matrix
                    continue
                seen.add(t.key)
                b = t.local_bytes(layout.tp, c.tp)
                total += b
                if t.buffer:
                    buffers += b
                else:
                    params += b
            parts[label] = parts.get(label, 0) + total

        if first:
            hold("embedding", s.embedding)
        per_layer = {sum(t.local_bytes(layout.tp, c.tp) for t in s.layers[i]) for i in layers}
        detail = f"{len(layers)} x {fmt_bytes(per_layer.pop())}" if len(per_layer) == 1 else f"{len(layers)} layers"
        if layout.tp > 1:
            detail += f", q/k/v/o/gate/up/down at 1/{layout.tp}"
        hold(f"{_layers_label(layers)} ({detail})", [t for i in layers for t in s.layers[i]])
        if last:
            hold("final norm", s.final_norm)
            hold("LM head (tied: the embedding)" if s.tied and first else "LM head", s.head)
        hold("rotary buffers", s.every_stage)

        kvh = _local(d["kv_heads"], layout.tp, c.tp)
        cached = _cached_tokens(s.config, layers, work)
        kv = 2 * rows * sum(cached) * kvh * d["head_dim"] * e
        kv_formula = (
            f"2 (k, v) x {rows} row{'s' if rows != 1 else ''} x {_tokens_text(cached, work)} x {kvh} KV head{'s' if kvh != 1 else ''} "
            f"({d['kv_heads']}/{layout.tp}) x {d['head_dim']} head dim x {e} B"
        )
        if rows:
            phase, act = _activations(s, work, rows=rows, mb=mb, cached=cached, tp=layout.tp,
                                      tp_rank=c.tp, last=last, pp=layout.pp)
        else:  # a replica without prompts runs nothing
            phase, act = "idle", {}
        out.append(
            RankPlan(
                rank=rank, dp=c.dp, pp=c.pp, tp=c.tp, layers=layers, rows=rows, microbatch_rows=mb,
                parameters=params, buffers=buffers, kv_cache=kv, activations=sum(act.values()),
                weight_parts=parts, kv_formula=kv_formula, activation_parts=act, activation_phase=phase,
            )
        )
    return out


def _layers_label(layers: range) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]}-{layers[-1]}"


def _tokens_text(cached: list[int], work: Workload) -> str:
    counts: dict[int, int] = {}
    for n in cached:
        counts[n] = counts.get(n, 0) + 1
    pieces = []
    for n, k in counts.items():
        what = f"{n} tokens"
        if n == work.tokens and work.max_new_tokens > 1:
            what = f"{n} tokens ({work.prompt_len} prompt + {work.max_new_tokens - 1} of the {work.max_new_tokens} new)"
        elif n != work.tokens:
            what = f"{n} tokens (sliding window)"
        pieces.append(f"{k} layer{'s' if k != 1 else ''} x {what}")
    return "(" + " + ".join(pieces) + ")" if len(pieces) > 1 else pieces[0]


# --------------------------------------------------------------------------- devices
def _engine_count(engines) -> int | None:
    if engines is None:
        return None
    if isinstance(engines, bool) or not (isinstance(engines, int) or hasattr(engines, "world_size")):
        raise MpbookError(f"engines={engines!r}: give a number of engines or a Workbench")
    n = engines if isinstance(engines, int) else engines.world_size
    if n < 1:
        raise MpbookError(f"engines={n}: need at least 1 engine")
    return n


def _devices(engines, device_memory_bytes, world: int) -> tuple[list[Device], str]:
    """Each rank's device and its free memory: given, asked of the engines, or of this machine."""
    if device_memory_bytes is not None:
        if isinstance(device_memory_bytes, (int, float)) and not isinstance(device_memory_bytes, bool):
            sizes = [int(device_memory_bytes)] * world
        else:
            sizes = [int(b) for b in device_memory_bytes]
            if len(sizes) != world:
                raise MpbookError(
                    f"device_memory_bytes lists {len(sizes)} sizes for {world} ranks; give one size, or one per rank"
                )
        if any(b <= 0 for b in sizes):
            raise MpbookError(f"device_memory_bytes={device_memory_bytes!r}: sizes must be positive byte counts")
        return [Device("given", f"rank {r}", b) for r, b in enumerate(sizes)], "as given"
    if engines is not None and hasattr(engines, "status"):
        infos = engines.status()
        return [
            Device(i.device, i.host, i.memory_free_bytes, shared=not i.device.startswith("cuda")) for i in infos
        ], "free memory reported by the engines"
    return _local_devices(world)


def _local_devices(world: int) -> tuple[list[Device], str]:
    import socket

    from .devices import visible_gpu_count

    host = socket.gethostname()
    gpus = visible_gpu_count()
    if gpus >= world:
        # NVML, not torch.cuda: the client must not create a CUDA context before engines start.
        import pynvml

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
        pynvml.nvmlInit()
        try:
            out = []
            for r in range(world):
                ident = ids[r]
                handle = (
                    pynvml.nvmlDeviceGetHandleByIndex(int(ident))
                    if ident.isdigit()
                    else pynvml.nvmlDeviceGetHandleByUUID(ident)
                )
                out.append(Device(f"cuda:{r}", host, int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)))
        finally:
            pynvml.nvmlShutdown()
        return out, "free GPU memory on this machine (NVML)"
    import psutil

    available = int(psutil.virtual_memory().available)
    how = "available host memory on this machine, shared by CPU engines"
    if gpus:
        how += f" ({gpus} GPU{'s' if gpus > 1 else ''} visible, fewer than {world} ranks)"
    return [Device("cpu", host, available, shared=True) for _ in range(world)], how


def _fit(ranks: list[RankPlan], devices: list[Device]) -> list[RankPlan]:
    """Each rank with its device and whether it fits; ranks sharing host memory fit together."""
    pools: dict[str, int] = {}
    for r, dev in zip(ranks, devices):
        if dev.shared:
            pools[dev.host] = pools.get(dev.host, 0) + r.total
    out = []
    for r, dev in zip(ranks, devices):
        need = pools[dev.host] if dev.shared else r.total
        out.append(replace(r, device=dev, fits=need <= dev.free_bytes))
    return out


# --------------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Suggestion:
    """A layout over the same engines: whether it is valid and fits, and why (not)."""

    layout: Layout
    valid: bool
    fits: bool
    peak_bytes: int | None  # the largest per-rank total
    reason: str

    def __str__(self) -> str:
        mark = "fits" if self.fits else ("does not fit" if self.valid else "invalid")
        peak = f"{fmt_bytes(self.peak_bytes):>10} per rank at most" if self.peak_bytes is not None else " " * 27
        return f"{str(self.layout):<22} {mark:<13} {peak}  {self.reason}"


def layouts(world: int) -> list[Layout]:
    """Every (dp, pp, tp) whose product is ``world``."""
    return [
        Layout(dp, pp, world // (dp * pp))
        for dp in range(1, world + 1)
        for pp in range(1, world + 1)
        if world % (dp * pp) == 0
    ]


def _why_invalid(config, layout: Layout, batch: int | None = None) -> str | None:
    from .parallel.pipeline import split_layers
    from .parallel.tensor import validate_tp

    try:
        validate_tp(config, layout.tp)
        split_layers(config.num_hidden_layers, layout.pp)
    except MpbookError as exc:
        return str(exc).split(";")[0]
    if batch is not None and layout.dp > batch:
        return f"dp={layout.dp} > {batch} prompt{'s' if batch != 1 else ''}: replicas would sit idle"
    return None


def _suggest(s: _Structure, work: Workload, world: int, devices: list[Device]) -> list[Suggestion]:
    good, bad = [], []
    for layout in layouts(world):
        why = _why_invalid(s.config, layout, work.batch)
        if why is not None:
            bad.append(Suggestion(layout, False, False, None, why))
            continue
        ranks = _fit(_rank_plans(s, layout, replace(work, stage_sizes=None)), devices)
        peak = max(r.total for r in ranks)
        if all(r.fits for r in ranks):
            if devices[0].shared:
                together = sum(r.total for r in ranks if r.device.host == devices[0].host)
                reason = f"{fmt_bytes(together)} together of {fmt_bytes(devices[0].free_bytes)} shared host memory"
            else:
                reason = f"{fmt_bytes(min(d.free_bytes for d in devices))} free on the smallest device"
            good.append(Suggestion(layout, True, True, peak, reason))
        else:
            worst = next(r for r in ranks if not r.fits)
            reason = f"rank {worst.rank} needs {fmt_bytes(worst.total)}"
            if worst.device.shared:
                reason = f"the ranks on {worst.device.host} need {fmt_bytes(sum(r.total for r in ranks if r.device.host == worst.device.host))} together"
            bad.append(Suggestion(layout, True, False, peak, f"{reason}, {fmt_bytes(worst.device.free_bytes)} free"))
    # Most headroom first; among equals, fewer collectives: smaller tp, then smaller pp.
    key = lambda g: (g.peak_bytes if g.peak_bytes is not None else math.inf, g.layout.tp, g.layout.pp)  # noqa: E731
    return sorted(good, key=key) + sorted((b for b in bad if b.valid), key=key) + [b for b in bad if not b.valid]


# --------------------------------------------------------------------------- the result
def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryPlan:
    """Predicted per-rank memory of one layout, whether it fits, and other layouts that would.

    Each rank's ``total`` is its predicted peak: weights + KV cache (at the full length:
    the prompt and every new token but the last) + activations (the largest forward of one micro-batch). Weights and
    KV cache are exact for the module tree and DynamicCache; activations are an estimate.
    """

    model: str
    architecture: str
    layout: Layout
    workload: Workload
    ranks: list[RankPlan]
    memory_source: str
    suggestions: list[Suggestion]
    _structure: _Structure = field(repr=False, compare=False)
    _devices: list[Device] = field(repr=False, compare=False)

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    @property
    def peak_bytes(self) -> int:
        """The largest per-rank total."""
        return max(r.total for r in self.ranks)

    def rank(self, rank: int) -> RankPlan:
        return self.ranks[rank]

    def suggest(self, engines=None, *, device_memory_bytes=None) -> list[Suggestion]:
        """Layouts over ``engines`` (default: this plan's ranks) valid for the model, fitting ones first."""
        world = _engine_count(engines) or self.layout.world_size
        if engines is None and device_memory_bytes is None and world == self.layout.world_size:
            devices = self._devices
        else:
            devices, _ = _devices(engines, device_memory_bytes, world)
        return _suggest(self._structure, self.workload, world, devices)

    # ------------------------------------------------------------------ rendering
    def _header(self) -> str:
        w = self.workload
        tokens = f"{w.prompt_len} prompt" + (f" + {w.max_new_tokens} new tokens" if w.max_new_tokens else " tokens")
        mbs = f", {w.microbatches} micro-batches" if w.microbatches > 1 else ""
        return (
            f"mpbook.plan: {self.model} ({self.architecture}), {self.layout}, {w.dtype}, "
            f"{w.batch} prompt{'s' if w.batch != 1 else ''} x {tokens}{mbs}, {w.attention} attention"
        )

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [("rank", "dp", "pp", "tp", "layers", "rows", "weights", "KV cache", "activations", "total",
                 "free", "fits")]
        for r in self.ranks:
            free = fmt_bytes(r.device.free_bytes) + ("*" if r.device.shared else "") if r.device else "-"
            rows.append((
                str(r.rank), str(r.dp), str(r.pp), str(r.tp), _layers_label(r.layers).split(" ")[1], str(r.rows),
                fmt_bytes(r.weights), fmt_bytes(r.kv_cache), fmt_bytes(r.activations), fmt_bytes(r.total),
                free, {True: "yes", False: "NO", None: "?"}[r.fits],
            ))
        return rows

    def arithmetic(self) -> list[str]:
        """How the numbers are made, once for each group of ranks that hold the same."""
        lines = []
        shown: set[tuple] = set()
        for r in self.ranks:
            sig = (r.pp, r.weights, r.kv_cache, r.activations)
            if sig in shown:
                continue
            shown.add(sig)
            same = [x.rank for x in self.ranks if (x.pp, x.weights, x.kv_cache, x.activations) == sig]
            lines.append(f"rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} "
                         f"(stage {r.pp}, {_layers_label(r.layers)}):")
            parts = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in r.weight_parts.items() if v or "tied" in k)
            lines.append(f"  weights     = {parts} = {fmt_bytes(r.weights)}")
            lines.append(f"  KV cache    = {r.kv_formula} = {fmt_bytes(r.kv_cache)}")
            if r.activation_parts:
                act = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in r.activation_parts.items())
                what = "prefill" if r.activation_phase == "prefill" else "a decode step"
                lines.append(f"  activations = {what} of {r.microbatch_rows} row{'s' if r.microbatch_rows != 1 else ''}: "
                             f"{act} = {fmt_bytes(r.activations)}")
            else:
                lines.append("  activations = none: this replica has no prompts")
            lines.append(f"  total       = {fmt_bytes(r.weights)} + {fmt_bytes(r.kv_cache)} + "
                         f"{fmt_bytes(r.activations)} = {fmt_bytes(r.total)}")
        return lines

    def _verdict(self) -> str:
        if self.fits:
            return f"Fits: at most {fmt_bytes(self.peak_bytes)} on a rank ({self.memory_source})."
        bad = [r for r in self.ranks if not r.fits]
        return (f"Does NOT fit on rank{'s' if len(bad) > 1 else ''} {', '.join(str(r.rank) for r in bad)} "
                f"({self.memory_source}).")

    def _notes(self) -> list[str]:
        notes = ["Peak per rank = weights + KV cache + activations; activations are an estimate "
                 "(see mpbook.plan's docstring), and the runtime (CUDA context, allocator slack) is not counted."]
        if any(r.device and r.device.shared for r in self.ranks):
            notes.append("* CPU engines on one host share its memory: they fit together or not at all.")
        return notes

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = [
            "  ".join(cell.rjust(w) if i not in (4,) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        out = [self._header(), "", *table, "", *self.arithmetic(), "", self._verdict(), *self._notes()]
        if self.suggestions:
            out += ["", f"Layouts over {self.layout.world_size} engine{'s' if self.layout.world_size > 1 else ''}:"]
            out += [f"  {s}" for s in self.suggestions]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = self._rows()
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = ""
        for row, r in zip(rows[1:], self.ranks):
            style = "" if r.fits is not False else ' style="color:#b00020;font-weight:bold"'
            body += f"<tr{style}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        sugg = ""
        if self.suggestions:
            items = "".join(f"<li><code>{esc(str(s.layout))}</code>: "
                            f"{'fits' if s.fits else ('does not fit' if s.valid else 'invalid')}"
                            f"{', ' + esc(fmt_bytes(s.peak_bytes)) + ' per rank at most' if s.peak_bytes else ''}"
                            f" ({esc(s.reason)})</li>" for s in self.suggestions)
            sugg = f"<p>Layouts over {self.layout.world_size} engines:</p><ul>{items}</ul>"
        return (
            f"<div><p><b>{esc(self._header())}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<pre>{esc(chr(10).join(self.arithmetic()))}</pre>"
            f"<p>{esc(self._verdict())}<br>{'<br>'.join(esc(n) for n in self._notes())}</p>{sugg}</div>"
        )


# --------------------------------------------------------------------------- entry point
def _whole(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MpbookError(f"{name}={value!r}: must be a whole number >= {low}")
    return value


def _dtype_name(dtype, model) -> str:
    if dtype is None:
        if model is not None and hasattr(model, "dtype"):
            return str(model.dtype).removeprefix("torch.")
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise MpbookError(f"dtype={dtype!r} is not one mpbook runs in; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def _resolve(model) -> tuple[Any, Any, str]:
    """(config, loaded model or None, label) from a config, a model name or folder, or a model."""
    from transformers import PretrainedConfig

    from . import models

    if isinstance(model, PretrainedConfig):
        return model, None, getattr(model, "name_or_path", "") or type(model).__name__
    if hasattr(model, "config") and hasattr(model, "parameters"):
        return model.config, model, getattr(model.config, "name_or_path", "") or type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        # The preset needs no files: plan before anything is built or downloaded.
        config = models.PRESETS[name]() if name in models.PRESETS else models.load_config(name)
        return config, None, name
    raise MpbookError(
        f"plan() got a {type(model).__name__}; give a transformers config, a model name or folder, or a loaded model"
    )


def plan(
    model,
    /,
    *,
    dp: int = 1,
    pp: int = 1,
    tp: int = 1,
    batch: int = 1,
    prompt_len: int = 128,
    max_new_tokens: int = 32,
    dtype=None,
    microbatches: int = 1,
    stage_sizes: Sequence[int] | None = None,
    attention: str | None = None,
    device_memory_bytes: int | Sequence[int] | None = None,
    engines=None,
) -> MemoryPlan:
    """Predict each rank's memory for running ``model`` on a (dp, pp, tp) layout.

    ``model``: a transformers config, a model name that :func:`mpbook.models.load_config`
    understands ("tiny", a ``save_pretrained`` folder, a hub id), or a loaded model (its
    config and dtype are used). Nothing is loaded: the module tree is built on the meta device.

    ``batch`` prompts, each padded to ``prompt_len`` tokens, generate ``max_new_tokens`` more
    (0: one forward pass returning every position's logits). ``microbatches`` cut each
    replica's prompts for the pipeline. ``dtype``: float32 (default; a loaded model's own
    dtype), bfloat16 or float16. ``attention``: "sdpa" (default; a fused kernel) or "eager".

    Fit is judged against ``device_memory_bytes`` (one size, or one per rank) when given;
    else the engines' free memory when ``engines`` is a Workbench; else this machine's free
    GPU memory (NVML) or, without enough GPUs, its available host memory, which CPU engines
    share. ``engines`` (a count or a Workbench) must equal dp * pp * tp, and the suggestions
    cover every layout over that many engines.

    Per rank, with b the rows of one micro-batch, q the query tokens (the prompt in the
    prefill, 1 in a decode step), k the key length, e bytes per element, and heads, KV heads
    and the MLP width divided by tp:

    - weights: the rank's own parameters and buffers of the meta-built model (exact);
    - KV cache: 2 x layers of the stage x rows of the replica x (prompt + new tokens - 1: the
      last new token is never fed back; or the sliding window) x KV heads/tp x head_dim x e
      (exact for transformers' DynamicCache; it is the end-of-generation size, so the
      prefill's peak is over-counted a little);
    - activations, an estimate of the largest live set in one forward of one micro-batch:
      hidden states 3·b·q·hidden·e + mask b·q·k·(e eager, 1 sdpa) + rotary 2·b·q·head_dim·e
      + max(attention, MLP), where attention = b·q·heads·head_dim·e (query) + repeated k/v
      for GQA 2·b·heads·k·head_dim·e (eager always, sdpa in the prefill) + (eager: scores
      b·heads·q·k·(e + 4 + e below float32), with their float32 softmax and its cast back;
      sdpa: the output twice), and MLP = 3·b·q·intermediate·e. On the last stage the
      LM head phase is 2·b·q·hidden·e + logits, counted in float32: the last position of a
      micro-batch when generating, every position of every row of the replica for a forward
      pass; the larger of the two phases counts. The prefill and the largest decode step
      (which also grows one layer's cache with torch.cat) are both estimated; the larger counts.
      Ops' internal workspaces and allocator rounding are not modelled.

    The peak a rank should be compared with is ``rank.total`` = weights + KV cache + activations.
    """
    from .parallel.pipeline import split_layers
    from .parallel.tensor import validate_tp

    config, loaded, label = _resolve(model)
    dtype_name = _dtype_name(dtype, loaded)
    if attention is None:
        attention = getattr(config, "_attn_implementation", None) if loaded is not None else None
        attention = attention if attention in ATTENTION else "sdpa"
    if attention not in ATTENTION:
        raise MpbookError(f"attention={attention!r}: choose one of {', '.join(ATTENTION)}")
    try:
        layout = Layout(dp, pp, tp)
    except ValueError as exc:
        raise MpbookError(str(exc)) from None
    count = _engine_count(engines)
    if count is not None and layout.world_size != count:
        valid = [str(x) for x in layouts(count) if _why_invalid(config, x) is None]
        raise MpbookError(
            f"{layout} uses {layout.world_size} engines but there are {count}; choose a layout whose product is "
            f"{count}: {'; '.join(valid) or 'none fits this model'}"
        )
    batch = _whole("batch", batch, 1)
    prompt_len = _whole("prompt_len", prompt_len, 1)
    max_new_tokens = _whole("max_new_tokens", max_new_tokens, 0)
    microbatches = _whole("microbatches", microbatches, 1)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and prompt_len + max_new_tokens > positions:
        raise MpbookError(
            f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} tokens is beyond "
            f"the model's {positions} positions (max_position_embeddings); keep the sum <= {positions}"
        )
    validate_tp(config, tp)
    split_layers(config.num_hidden_layers, pp, stage_sizes)
    work = Workload(batch, prompt_len, max_new_tokens, microbatches, dtype_name, attention,
                    tuple(stage_sizes) if stage_sizes is not None else None)

    import torch

    s = _structure(_meta_model(config, getattr(torch, dtype_name)), dtype_name, label)
    devices, source = _devices(engines, device_memory_bytes, layout.world_size)
    ranks = _fit(_rank_plans(s, layout, work), devices)
    return MemoryPlan(
        model=label,
        architecture=s.architecture,
        layout=layout,
        workload=work,
        ranks=ranks,
        memory_source=source,
        suggestions=_suggest(s, work, layout.world_size, devices),
        _structure=s,
        _devices=devices,
    )
