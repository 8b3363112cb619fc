"""What the machine does per second, measured once on the engines and kept: the speed model's inputs.

The speed model (:mod:`mpbook.planner.speed`) multiplies what a layout does (bytes of weights
and KV cache each rank reads per step, collectives and their sizes, decoder layers run) by what
this machine measured it costs. Four things are measured, on the engines themselves (their
process, their threads, their transport):

- **a linear's cost per weight byte at each row count**: a matmul of ``rows`` x 1024 by
  1024 x 1024 weights, cycled through 64 MiB of them so that they come from memory as a
  model's do, and stored in the order an engine stores its own for that many rows
  (:mod:`mpbook.models.weight_order`). At 1 row this is the memory bandwidth; at hundreds of
  rows the matmul rate. One curve covers decode (rows = a micro-batch) and prefill (rows x
  prompt tokens) alike.
- **the host's time per decoder layer**, around the layers (mask, positions, rotary tables) and
  for the head and the token's choice, for the model's family: a decode step of a tiny model of the same ``model_type``
  (:func:`mpbook.models.shrink.shrink_config`), each layer timed by hooks. Its compute is
  negligible, so what remains is Python and dispatch, which does not depend on the width.
- **all-reduce and send costs** on the cluster's own transport, latency plus bytes over
  bandwidth, from two sizes each, back to back (as a layer's calls come).
- each of the first two **alone and together**: one engine, then every engine at once, since
  CPU engines share the memory bus and the cores (on a GPU each engine has its own).

Kept per (hosts, device, threads, engines, transport, dtype) in mpbook's cache folder
(``MPBOOK_CACHE``), so it is measured once; ``calibrate(..., again=True)``
(:mod:`mpbook.planner.calibrating`) measures again (after the machine changed, or when it was
busy while measuring).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path


ROWS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)  # 3 and 4: either side of the weight order's switch
WIDTH = 1024  # the probe's weights: WIDTH x WIDTH
POOL_BYTES = 64 << 20  # twice this VM kind's L3: weights come from memory, as a model's do
PROBE_SECONDS = 0.04  # per row count: enough calls for a stable median, short in total
LINK_SIZES = (8 << 10, 1 << 20)
HOST_ROWS = (1, 8)  # a decode step's host time grows with its rows (masks, attention): two points
VERSION = 11


@dataclass(frozen=True)
class Cost:
    """A call's time: ``latency_s`` + bytes x ``seconds_per_byte``."""

    latency_s: float
    seconds_per_byte: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.seconds_per_byte

    @classmethod
    def through(cls, small: tuple[int, float], large: tuple[int, float]) -> Cost:
        """The line through two (bytes, seconds) points, never below zero."""
        (b1, t1), (b2, t2) = small, large
        per_byte = max((t2 - t1) / (b2 - b1), 0.0)
        return cls(max(t1 - b1 * per_byte, 0.0), per_byte)


def shared_seconds(alone: float, together: float, busy: float, engines: int) -> float:
    """The time of one unit of work on each of ``busy`` engines of a host of ``engines``, from
    its time with one engine working (``alone``) and with all of them (``together``).

    All the engines together did ``engines / together`` units a second, in all: ``busy`` of them
    share that, each doing no more than one alone, so ``max(alone, together x busy / engines)``.
    Where the engines together did less in all than one alone (contention that costs more than
    the second engine gives, or a noisy measurement), there is no capacity to share: the time
    is interpolated between the two measurements instead."""
    if engines <= 1:
        return alone
    if together <= engines * alone:
        return max(alone, together * busy / engines)
    return alone + (together - alone) * (busy - 1) / (engines - 1)


@dataclass(frozen=True)
class HostTime:
    """Host seconds of one decode step of a model family: per decoder layer; the base model's
    work around its layers (mask, positions, rotary tables: every pipeline stage does it); and
    the last stage's final norm, head and the token's choice."""

    per_layer_s: float
    per_stage_s: float
    head_s: float

    def mixed(self, other: HostTime, share: float, *, clamp: bool = True) -> HostTime:
        """``share`` of the way from this to ``other`` (``clamp=False``: beyond them too, never
        below zero)."""
        if clamp:
            share = min(max(share, 0.0), 1.0)
        return HostTime(*(max(a + share * (b - a), 0.0) for a, b in zip(astuple(self), astuple(other))))

    def scaled(self, factor: float) -> HostTime:
        return HostTime(*(a * factor for a in astuple(self)))

    def slowest(self, other: HostTime) -> HostTime:
        return HostTime(*(max(a, b) for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class Rates:
    """One engine's rates, alone or with every engine of its host busy at once."""

    seconds_per_weight_byte: dict[int, float]  # rows -> seconds per weight byte through a linear
    host: dict[str, dict[int, HostTime]] = field(default_factory=dict)  # model_type -> rows -> host times

    def host_time(self, model_type: str, rows: int) -> HostTime | None:
        """The family's host times at ``rows`` rows: on the line through the measured row counts
        (beyond them, the last segment's slope)."""
        curve = sorted(self.host.get(model_type, {}).items())
        if not curve:
            return None
        if len(curve) == 1:
            return curve[0][1]
        (r1, h1), (r2, h2) = next(((a, b) for a, b in zip(curve, curve[1:]) if rows <= b[0]), curve[-2:])
        return h1.mixed(h2, (rows - r1) / (r2 - r1), clamp=False)

    def linear_seconds(self, weight_bytes: float, rows: int) -> float:
        """Time for ``rows`` rows through linears holding ``weight_bytes``: the measured curve,
        interpolated between row counts; beyond the largest, time grows with the rows (compute)."""
        curve = sorted((int(r), s) for r, s in self.seconds_per_weight_byte.items())
        rows = max(rows, 1)
        if rows >= curve[-1][0]:
            top, per_byte = curve[-1]
            return weight_bytes * per_byte * rows / top
        for (r1, s1), (r2, s2) in zip(curve, curve[1:]):
            if r1 <= rows <= r2:
                share = (rows - r1) / (r2 - r1)
                return weight_bytes * (s1 + share * (s2 - s1))
        return weight_bytes * curve[0][1]

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Bytes of weights a one-row linear streams per second: the memory bandwidth."""
        return 1.0 / self.linear_seconds(1.0, 1)

    def matmul_flops_per_s(self, element_size: int) -> float:
        """Multiply-adds x 2 per second at the largest row count measured."""
        rows = max(int(r) for r in self.seconds_per_weight_byte)
        return 2 * rows / (element_size * self.linear_seconds(1.0, rows))


@dataclass(frozen=True)
class Calibration:
    """What one cluster's engines measured; see the module's docstring."""

    key: str
    device: str  # "cpu" or the GPU's name
    threads: int
    engines_per_host: int
    transport: str
    dtype: str
    alone: Rates
    together: Rates
    all_reduce: Cost | None  # None on one engine
    send: Cost | None
    measured_at: str = ""
    # From the reference runs (see calibrate): how many times the probe's host time a step takes
    # in the engines' own decode loop, and an all-reduce's time inside a real step by group size.
    ranks: int = 2  # the world the collectives were measured over
    engine_factor: float = 1.0
    weights_factor: float = 1.0  # the same for the weights' streaming (the model's own shapes and kernels)
    step_all_reduce_s: dict[int, float] = field(default_factory=dict)  # group size -> see all_reduce_in_step
    step_send_s: float | None = None  # a pipeline hop inside a real decode step (see send_in_step)

    def send_in_step(self) -> Cost | None:
        """A pipeline hop as a decode step pays it: the send and receive with the stage's own
        work around them (its schedule's bookkeeping, the wait for the receiving stage) when
        the reference run measured it, else the back-to-back send."""
        if self.send is None:
            return None
        return Cost(max(self.send.latency_s, self.step_send_s or 0.0), self.send.seconds_per_byte)

    def all_reduce_in_step(self, group: int) -> Cost | None:
        """An all-reduce over ``group`` ranks as a decode step pays it.

        Back to back it costs what the links measured over every rank (for a smaller group
        scaled by the rounds a small all-reduce takes: recursive doubling, log2 of the ranks).
        Inside a real step the ranks reach it apart (a peer was slower, or, with more engines
        than cores, descheduled while another engine ran), and that wait is part of the call:
        the reference runs fitted it per group size (the nearest fitted size, scaled the same
        way, for another). On 4 engines of 2 cores, groups of 4, it came to 0.5-0.7 ms a call
        fitted on ``tiny`` and 0.9-1.4 ms on ``small`` (0.3-0.5 ms back to back)."""
        if self.all_reduce is None:
            return None
        latency = self.all_reduce.latency_s
        if 2 <= group < self.ranks:
            latency *= math.log2(group) / math.log2(self.ranks)
        if self.step_all_reduce_s and group >= 2:
            nearest = min(self.step_all_reduce_s, key=lambda g: (abs(math.log2(g) - math.log2(group)), g))
            latency = max(latency, self.step_all_reduce_s[nearest] * math.log2(group) / math.log2(nearest))
        return Cost(latency, self.all_reduce.seconds_per_byte)

    def rates(self, busy: float) -> Rates:
        """Rates with ``busy`` engines of a host working at once (1: alone; all: together).

        The host's cores and memory bus are shared: all its engines busy together got, in all,
        what ``together`` measured; ``busy`` of them share that capacity, each getting at most
        what one gets alone. So each figure's time is ``max(alone, together x busy / engines)``
        (:func:`shared_seconds`)."""
        n = self.engines_per_host
        busy = min(max(busy, 1.0), float(max(n, 1)))
        per_byte = {r: shared_seconds(s, self.together.seconds_per_weight_byte[r], busy, n) * self.weights_factor
                    for r, s in self.alone.seconds_per_weight_byte.items()}
        factor = self.engine_factor
        host = {arch: {r: HostTime(*(shared_seconds(a, t, busy, n) for a, t in
                                     zip(astuple(h), astuple(self.together.host[arch][r])))).scaled(factor)
                       for r, h in curve.items()}
                for arch, curve in self.alone.host.items() if arch in self.together.host}
        return Rates(per_byte, host)

    def has_host_time(self, model_type: str) -> bool:
        return model_type in self.alone.host and model_type in self.together.host

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            raise ValueError("another version")

        def rates(d: dict) -> Rates:
            return Rates({int(r): s for r, s in d["seconds_per_weight_byte"].items()},
                         {k: {int(r): HostTime(**h) for r, h in v.items()} for k, v in d["host"].items()})

        return cls(**{**data, "alone": rates(data["alone"]), "together": rates(data["together"]),
                      "step_all_reduce_s": {int(g): t for g, t in data["step_all_reduce_s"].items()},
                      "all_reduce": Cost(**data["all_reduce"]) if data["all_reduce"] else None,
                      "send": Cost(**data["send"]) if data["send"] else None})

    def summary(self) -> str:
        """One line of the figures that matter most."""
        a, t = self.alone, self.together
        e = _element_size(self.dtype)
        words = [
            f"{self.device}, {self.threads} thread{'s' if self.threads != 1 else ''}/engine, {self.dtype}: "
            f"{a.bandwidth_bytes_per_s / 1e9:.1f} GB/s and {a.matmul_flops_per_s(e) / 1e9:.0f} GFLOP/s alone",
            f"{t.bandwidth_bytes_per_s / 1e9:.1f} GB/s and {t.matmul_flops_per_s(e) / 1e9:.0f} GFLOP/s each "
            f"with {self.engines_per_host} busy",
        ]
        if self.all_reduce is not None:
            words.append(f"all-reduce {self.all_reduce.seconds(8 << 10) * 1e6:.0f} us at 8 KiB over {self.transport}"
                         + (" back to back; inside a decode step "
                            + ", ".join(f"{s * 1e6:.0f} us in groups of {g}"
                                        for g, s in sorted(self.step_all_reduce_s.items()))
                            if self.step_all_reduce_s else ""))
        if self.send is not None and self.step_send_s is not None:
            words.append(f"a pipeline hop {self.step_send_s * 1e6:.0f} us inside a decode step "
                         f"({self.send.seconds(8 << 10) * 1e6:.0f} us back to back at 8 KiB)")
        words.append(f"the engines' decode: {self.engine_factor:.2f}x the probe's host time, "
                     f"{self.weights_factor:.2f}x its time per weight byte")
        for arch in sorted(a.host):
            h = a.host_time(arch, 1)
            words.append(f"{arch}: host {h.per_layer_s * 1e3:.2f} ms a layer, {h.per_stage_s * 1e3:.2f} ms around "
                         f"them, {h.head_s * 1e3:.2f} ms head and choice at 1 row")
        return "; ".join(words)


def _element_size(dtype: str) -> int:
    from ..protocol import ELEMENT_SIZE

    return ELEMENT_SIZE[dtype]


# ----------------------------------------------------------------------------- on an engine
def measure_linear(state=None, *, dtype: str = "float32") -> dict[int, float]:
    """Seconds per weight byte of ``rows`` rows through WIDTH x WIDTH linears (runs on an engine),
    each weight stored as a run of that many rows has it (packed or ordered: mpbook.models.weight_order)."""
    import torch

    from ..models.weight_order import order_weights

    torch_dtype = getattr(torch, dtype)
    e = torch.finfo(torch_dtype).bits // 8
    device = getattr(state, "device", "cpu")
    count = max(POOL_BYTES // (WIDTH * WIDTH * e), 2)
    pool = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False, device=device, dtype=torch_dtype)
                               for _ in range(count))
    out: dict[int, float] = {}
    with torch.inference_mode():
        for rows in ROWS:
            order_weights(pool, rows=rows)
            x = torch.randn(rows, WIDTH, device=device).to(torch_dtype)
            pool[0](x)  # first touch of this shape's kernel
            times = []
            began = time.perf_counter()
            while time.perf_counter() - began < PROBE_SECONDS or len(times) < 3:
                start = time.perf_counter()
                for linear in pool:
                    linear(x)
                _synchronize(device)
                times.append(time.perf_counter() - start)
            out[rows] = sorted(times)[len(times) // 2] / (count * WIDTH * WIDTH * e)
    del pool
    return out


def measure_host(state=None, *, model_type: str, steps: int = 12, rows=HOST_ROWS) -> dict[int, HostTime]:
    """Host time of a decode step of a tiny ``model_type`` model at each of ``rows`` row counts:
    per layer (hooks), around the layers, and the rest."""
    from transformers import AutoModelForCausalLM

    device = getattr(state, "device", "cpu")  # on a GPU: the launches' host time, as a real step's
    config = _probe_config(model_type)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    base = model.get_decoder()
    layers = base.layers
    stamps: list[float] = []
    around: list[float] = []  # the base model's forward: began, ended
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
        layer.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    base.register_forward_pre_hook(lambda *_: around.append(time.perf_counter()))
    base.register_forward_hook(lambda *_: around.append(time.perf_counter()))
    return {r: _host_steps(model, config, device, r, steps, stamps, around) for r in rows}


@functools.lru_cache(maxsize=8)
def _probe_config(model_type: str):
    """The tiny config of ``model_type`` (finding it builds many configs: seconds, once a process)."""
    from ..models.shrink import shrink_config

    return shrink_config(model_type)


def warm_up(state=None, *, model_types=()) -> None:
    """What the first measurement would otherwise pay inside its timing: the imports, the probe's
    configs and kernels (every engine at once, before any engine measures)."""
    for model_type in model_types:
        measure_host(state, model_type=model_type, steps=1, rows=(1,))


def _host_steps(model, config, device, rows: int, steps: int, stamps: list, around: list) -> HostTime:
    import torch
    from transformers import DynamicCache

    layers = model.get_decoder().layers
    # As an engine's stage calls it (mpbook.models.loading.Stage.forward): left-padded prompts
    # (the mask has holes, so attention takes its masked path), positions, transformers'
    # DynamicCache, the last position's logits.
    prompt = 8
    ids = torch.randint(0, config.vocab_size, (rows, prompt), device=device)
    mask = torch.ones(rows, prompt, dtype=torch.long, device=device)
    mask[0, :2] = 0  # the first row is the shorter prompt
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=config)
    per_layer, per_stage, head = [], [], []
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            stamps.clear()
            around.clear()
            began = time.perf_counter()
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=-1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                           logits_to_keep=1).logits
            token = logits[:, -1].float().argmax(-1, keepdim=True)
            token.tolist()  # as a decode step hands its tokens on
            total = time.perf_counter() - began
            inside = sum(b - a for a, b in zip(stamps[::2], stamps[1::2]))
            in_base = around[1] - around[0]
            per_layer.append(inside / len(layers))
            per_stage.append(in_base - inside)
            head.append(total - in_base)
    return HostTime(_median(per_layer), _median(per_stage), _median(head))


def measure_links(state) -> dict | None:
    """All-reduce (back to back) and send/recv costs over this cluster's transport (every rank)."""
    import torch

    from ..parallel.collectives import Group

    if state.world_size < 2:
        return None
    comm = state.mpi
    group = Group(None, rank=state.rank, size=state.world_size, ranks=list(range(state.world_size)), comm=comm)
    reduce_points, send_points = [], []
    for nbytes in LINK_SIZES:
        tensor = torch.ones(nbytes // 4, device=state.device)
        times = _timed(lambda: group.all_reduce(tensor), state.device, calls=60)
        reduce_points.append((nbytes, _median(times)))
        send_points.append((nbytes, _median(_ping_pong(state, comm, tensor))))
    return {"all_reduce": Cost.through(*reduce_points), "send": Cost.through(*send_points)}


def _ping_pong(state, comm, tensor, calls: int = 40) -> list[float]:
    """Ranks 0 and 1 pass ``tensor`` back and forth; half a round trip each (others idle)."""
    import torch.distributed as dist

    if state.rank > 1:
        return [0.0]

    def send():
        comm.wait(comm.isend(tensor, 1 - state.rank, 0)) if comm is not None else dist.send(tensor, dst=1 - state.rank)

    def recv():
        comm.recv(tensor, 1 - state.rank, 0) if comm is not None else dist.recv(tensor, src=1 - state.rank)

    first, second = (send, recv) if state.rank == 0 else (recv, send)
    return [t / 2 for t in _timed(lambda: (first(), second()), state.device, calls=calls)]


def _timed(call, device, *, calls: int, warmup: int = 5) -> list[float]:
    times = []
    for i in range(warmup + calls):
        began = time.perf_counter()
        call()
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


def _synchronize(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def measure_rates(state, *, dtype: str, model_types: tuple[str, ...]) -> Rates:
    """This engine's linear curve and host times (every engine measuring at once, or one alone)."""
    return Rates(measure_linear(state, dtype=dtype), host_times(state, model_types=model_types))


# ----------------------------------------------------------------------------- the client
def cache_path(key: str) -> Path:
    from ..models.presets import cache_dir

    return cache_dir() / "calibration" / f"{key}.json"


def cluster_key(engines, dtype: str) -> tuple[str, dict]:
    """The cache key of a cluster (and the facts it is made of)."""
    import re

    import torch

    infos = engines.status()
    hosts = sorted({i.host for i in infos})
    per_host = max(sum(1 for i in infos if i.host == h) for h in hosts)
    first = infos[0]
    facts = dict(device=first.device_name or first.device, threads=first.threads, engines_per_host=per_host,
                 transport=first.transport or first.backend, dtype=dtype)
    words = [*hosts, facts["device"], f"{facts['threads']}t", f"{per_host}e", facts["transport"], dtype,
             f"torch{torch.__version__}"]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "-".join(str(w) for w in words)), facts


def kept_calibration(engines, dtype: str) -> Calibration | None:
    """What :func:`calibrate` measured on this cluster before, or None (nothing is measured)."""
    try:
        key, _ = cluster_key(engines, dtype)
    except Exception:  # noqa: BLE001  a stopped cluster: no speed, the memory plan still stands
        return None
    return read_kept(cache_path(key))


def host_times(state, *, model_types) -> dict[str, dict[int, HostTime]]:
    return {t: measure_host(state, model_type=t) for t in model_types}


def slowest_rates(per_rank: list[Rates]) -> Rates:
    """The slowest engine's figures: a layout waits for its slowest rank."""
    per_byte = {r: max(x.seconds_per_weight_byte[r] for x in per_rank) for r in per_rank[0].seconds_per_weight_byte}
    return Rates(per_byte, slowest_host([x.host for x in per_rank]))


def slowest_host(per_rank: list[dict[str, dict[int, HostTime]]]) -> dict[str, dict[int, HostTime]]:
    out: dict[str, dict[int, HostTime]] = {}
    for t, curve in per_rank[0].items():
        out[t] = {}
        for r, slowest in curve.items():
            for other in per_rank[1:]:
                slowest = slowest.slowest(other[t][r])
            out[t][r] = slowest
    return out


def read_kept(path: Path) -> Calibration | None:
    try:
        return Calibration.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or an older format: measure
