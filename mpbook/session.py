"""Client side of inference: choose and check the layout, resolve the model once, dispatch.

Every check here runs before any engine does work, and each error names the numbers and the
valid choices. A model is resolved once per session (its folder, config and tokenizer are
kept), so a cell on a model already loaded costs the client only its own work. The engines
then load their part of the model (kept for the next run with the same model and layout) and
run :func:`mpbook.engine.decode.run`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import decode as engine_side
from .errors import MpbookError, RankError
from .layout import DIMS, Layout
from .options import (
    check_degree, check_dtype, check_max_new_tokens, check_microbatches, check_stage_sizes,
)
from .parallel.data import replica_rows
from .parallel.pipeline import split_layers
from .parallel.tensor import validate_tp
from .protocol import Request, Stopping
from .results import RunResult, merge

if TYPE_CHECKING:
    from .cluster import Calls, Cluster
    from .cluster.calls import Follow

STRATEGIES = ("data", "pipeline", "tensor")
OWN_DIM = {"data": "dp", "pipeline": "pp", "tensor": "tp", "expert": "ep"}


@dataclass
class ModelInfo:
    """What the client knows of a model, resolved once: its folder, config and tokenizer."""

    name: str
    folder: Any
    config: Any
    tokenizer: Any

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.folder).eos_token_id
        except OSError:  # no generation_config.json: the model config says
            eos = None
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        return tuple([eos] if isinstance(eos, int) else list(eos or []))


def choose_layout(strategy: str, engines: int, **given: int | None) -> Layout:
    """Degrees for ``strategy`` on ``engines`` engines: the strategy's own degree takes
    whatever the given ones leave (``tensor --pp 2`` on 4 engines is tp=2 x pp=2)."""
    if strategy not in STRATEGIES:
        raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    degrees = {dim: check_degree(dim, given.get(dim)) for dim in DIMS}
    own = OWN_DIM[strategy]
    others = math.prod(v for k, v in degrees.items() if k != own and v is not None)
    if degrees[own] is None:
        if engines % others:
            raise MpbookError(
                f"{' x '.join(f'{k}={v}' for k, v in degrees.items() if v is not None)} = {others} does not divide "
                f"the {engines} engines that are up; choose degrees whose product divides {engines}"
            )
        degrees[own] = engines // others
    layout = Layout(**{k: (v if v is not None else 1) for k, v in degrees.items()})
    if layout.world_size != engines:
        product = " x ".join(f"{d}={getattr(layout, d)}" for d in DIMS if d != "ep" or layout.ep > 1)
        raise MpbookError(
            f"{product} = {layout.world_size}, but {engines} engines are up; "
            f"choose degrees whose product is {engines} (or `%mp restart` with -n {layout.world_size})"
        )
    return layout


def check_prompts(prompts: Sequence[str]) -> None:
    """Something to tokenize: at least one prompt, none of them empty."""
    if not prompts:
        raise MpbookError("no prompts: write one prompt per line in the cell, or pass --prompts VARIABLE")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise MpbookError(f"prompt {i} is empty; every prompt needs at least one token")


def check_request(request: Request, *, strategy: str, config, prompt_tokens: list[int]) -> None:
    """Everything that can be known to fail before the engines start work.

    ``prompt_tokens``: each prompt's length in tokens."""
    from . import models

    layout = request.layout
    allowed = models.supported_strategies(config)
    used = [s for s, dim in OWN_DIM.items() if s in STRATEGIES and getattr(layout, dim) > 1] or [strategy]
    unsupported = [s for s in used if s not in allowed]
    if unsupported:
        raise MpbookError(
            f"{config.model_type} models support {', '.join(allowed)} parallelism in mpbook, not {', '.join(unsupported)}"
        )
    validate_tp(config, layout.tp)
    split_layers(config.num_hidden_layers, layout.pp, request.stage_sizes)
    prompts = len(request.input_ids)
    if prompts < layout.dp:
        raise MpbookError(
            f"{prompts} prompt{'s' if prompts != 1 else ''} for dp={layout.dp} replicas: "
            f"give at least {layout.dp} prompts, or use dp <= {prompts}"
        )
    smallest = min(len(replica_rows(prompts, layout.dp, r)) for r in range(layout.dp))
    if request.microbatches > smallest:
        raise MpbookError(
            f"--microbatches {request.microbatches}: each replica gets at least {smallest} prompt"
            f"{'s' if smallest != 1 else ''}, so choose microbatches in 1..{smallest} (or give more prompts)"
        )
    context = getattr(config, "max_position_embeddings", None)
    if context:
        for i, length in enumerate(prompt_tokens):
            if length + request.max_new_tokens > context:
                raise MpbookError(
                    f"prompt {i} has {length} tokens + {request.max_new_tokens} new = "
                    f"{length + request.max_new_tokens}, beyond the model's context of {context}; "
                    f"shorten it or lower --max-new-tokens"
                )


class Session:
    """Strategy runs on one cluster, with the models this kernel has resolved kept."""

    def __init__(self, cluster: Cluster, calls: Calls):
        self.cluster = cluster
        self.calls = calls
        self.models: dict[str, ModelInfo] = {}
        self._bf16: bool | None = None

    def model(self, name: str) -> ModelInfo:
        """Resolve ``name`` once: its folder, config and tokenizer (padding on the left)."""
        key = str(name)
        if key not in self.models:
            from . import models

            folder = models.resolve(key)
            self.models[key] = ModelInfo(key, folder, models.load_config(folder), models.load_tokenizer(folder))
        return self.models[key]

    def generate(
        self,
        prompts: Sequence[str] | str,
        *,
        strategy: str,
        model: str = "tiny",
        dp: int | None = None,
        pp: int | None = None,
        tp: int | None = None,
        ep: int | None = None,
        microbatches: int = 1,
        max_new_tokens: int = 32,
        dtype: str = "float32",
        stage_sizes: Sequence[int] | None = None,
        track_tensors: bool = False,
        follow: Follow | None = None,
    ) -> RunResult:
        """Generate (or, with ``max_new_tokens=0``, run a forward pass) with one layout."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cluster = self.cluster
        layout = choose_layout(strategy, cluster.world_size, dp=dp, pp=pp, tp=tp, ep=ep)
        dtype = check_dtype(dtype)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        microbatches = check_microbatches(microbatches)
        stage_sizes = check_stage_sizes(stage_sizes)
        check_prompts(prompts)
        info = self.model(model)
        tokenizer = info.tokenizer
        # Tokenized once here: the checks, the memory plan and the result all need the lengths.
        input_ids = tuple(tuple(ids) for ids in tokenizer(list(prompts))["input_ids"])
        prompt_tokens = [len(ids) for ids in input_ids]
        request = Request(
            model=str(model),
            layout=layout,
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            microbatches=microbatches,
            dtype=dtype,
            stage_sizes=stage_sizes,
            stopping=Stopping(max_new_tokens=max_new_tokens, eos_token_ids=info.eos_token_ids),
            track_tensors=track_tensors,
        )
        check_request(request, strategy=strategy, config=info.config, prompt_tokens=prompt_tokens)
        self.check_memory(request, config=info.config, prompt_len=max(prompt_tokens))
        if cluster.device_type == "cuda" and dtype == "bfloat16":
            if self._bf16 is None:
                self._bf16 = self.calls.apply(_bf16_supported, ranks=[0], stream=False, what="checking the dtype")[0]
            if not self._bf16:
                raise MpbookError("--dtype bfloat16: these GPUs do not support it; use float16 or float32")
        try:
            outputs = self.calls.apply(engine_side.run, request, what=f"the {strategy} run", follow=follow)
        except RankError as exc:
            oom = [f for f in exc.failures if f.ename == "DeviceOutOfMemory"]
            if not oom:
                raise
            raise MpbookError(f"{oom[0].evalue}; {self._layouts_that_fit(request, info.config, max(prompt_tokens))}") from None
        import dataclasses

        # What the engines hold and have free now, for the next cell's memory check (no extra call).
        cluster.engines = [
            dataclasses.replace(e, memory_free_bytes=o.memory_free_bytes, model_bytes=o.weight_bytes)
            for e, o in zip(cluster.engines, outputs)
        ]
        return merge(
            outputs, strategy=strategy, request=request, prompts=list(prompts), tokenizer=tokenizer,
            prompt_tokens=prompt_tokens, device_type=cluster.device_type,
        )

    def check_memory(self, request: Request, *, config, prompt_len: int) -> None:
        """Ask the planner whether every rank fits its device before anything loads; if not,
        name the rank, the bytes it needs and has, and the layouts that would fit."""
        from . import models
        from .planner import plan

        if "pipeline" not in models.supported_strategies(config):
            # The planner reads Llama-family module trees; other architectures are not predicted
            # (a device out-of-memory on an engine is still reported with its rank and bytes).
            return
        cluster = self.cluster
        engines = cluster.engines
        if cluster.device_type == "cuda":
            # A model already loaded on an engine is freed before another loads (or reused as is).
            free = [e.memory_free_bytes + e.model_bytes for e in engines]
        else:
            # CPU engines on one host share its memory (each reports the host's available
            # memory): each may count on an equal share of it, and of what its models free.
            hosts = [e.host for e in engines]
            pool = {h: next(e.memory_free_bytes for e in engines if e.host == h)
                    + sum(e.model_bytes for e in engines if e.host == h) for h in set(hosts)}
            free = [pool[h] // hosts.count(h) for h in hosts]
        layout = request.layout
        predicted = plan(
            config, dp=layout.dp, pp=layout.pp, tp=layout.tp, batch=len(request.input_ids), prompt_len=prompt_len,
            max_new_tokens=request.max_new_tokens, dtype=request.dtype, microbatches=request.microbatches,
            stage_sizes=request.stage_sizes, device_memory_bytes=free,
        )
        if predicted.fits:
            return
        from .units import format_bytes

        worst = max((r for r in predicted.ranks if not r.fits), key=lambda r: r.total)
        fitting = [str(s.layout) for s in predicted.suggestions if s.fits]
        world = cluster.world_size
        where = "shared by the engines on this host" if cluster.device_type == "cpu" else "free on its device"
        advice = (
            f"layouts that fit on {world} engines: {'; '.join(fitting)}" if fitting
            else f"no layout of {world} engines fits: use more devices, a smaller dtype, fewer prompts or fewer new tokens"
        )
        gib = lambda n: format_bytes(n, unit="GiB")  # noqa: E731
        raise MpbookError(
            f"out of memory (predicted): rank {worst.rank} needs {gib(worst.total)} (weights {gib(worst.weights)} "
            f"+ KV cache {gib(worst.kv_cache)} + activations {gib(worst.activations)}) but has "
            f"{gib(free[worst.rank])} {where}; {advice}"
        )

    def _layouts_that_fit(self, request: Request, config, prompt_len: int) -> str:
        try:
            self.check_memory(request, config=config, prompt_len=prompt_len)
        except MpbookError as exc:  # the planner agrees it does not fit: its advice
            return str(exc).rsplit("; ", 1)[-1]
        return "fewer prompts or new tokens per run, or more engines, need less memory per device"


def _bf16_supported(state) -> bool:
    import torch

    return torch.cuda.is_bf16_supported()

