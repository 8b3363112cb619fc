"""Client side of inference: choose and check the layout, then dispatch to the engines.

Every check here runs before any engine does work, and each error names the numbers and
the valid choices. The engines then load their part of the model (kept for the next run
with the same model and layout) and run :func:`mpbook.generate.run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import generate as engine_side
from .errors import MpbookError, RankError
from .generate import DTYPE_CHOICES, DTYPES, Request
from .mesh import Layout
from .parallel.data import split_batch
from .parallel.pipeline import split_layers
from .parallel.tensor import validate_tp
from .results import RunResult, merge

if TYPE_CHECKING:
    from .workbench import Workbench

STRATEGIES = ("data", "pipeline", "tensor")
OWN_DIM = {"data": "dp", "pipeline": "pp", "tensor": "tp"}


def choose_layout(
    strategy: str, engines: int, *, dp: int | None = None, pp: int | None = None, tp: int | None = None
) -> Layout:
    """Degrees for ``strategy`` on ``engines`` engines: the strategy's own degree takes
    whatever the given ones leave (``tensor --pp 2`` on 4 engines is tp=2 x pp=2)."""
    if strategy not in STRATEGIES:
        raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    degrees = {"dp": dp, "pp": pp, "tp": tp}
    for name, value in degrees.items():
        if value is not None and value < 1:
            raise MpbookError(f"--{name} {value}: a degree is a whole number >= 1")
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
        raise MpbookError(
            f"dp={layout.dp} x pp={layout.pp} x tp={layout.tp} = {layout.world_size}, but {engines} engines are up; "
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


def check(request: Request, *, strategy: str, config, prompt_tokens: list[int]) -> None:
    """Everything that can be known to fail before the engines start work.

    ``prompt_tokens``: each prompt's length in tokens."""
    from . import models

    layout = request.layout
    allowed = models.supported_strategies(config)
    used = [s for s, dim in OWN_DIM.items() if getattr(layout, dim) > 1] or [strategy]
    unsupported = [s for s in used if s not in allowed]
    if unsupported:
        raise MpbookError(
            f"{config.model_type} models support {', '.join(allowed)} parallelism in mpbook, not {', '.join(unsupported)}"
        )
    validate_tp(config, layout.tp)
    split_layers(config.num_hidden_layers, layout.pp, request.stage_sizes)
    if request.dtype not in DTYPES:
        raise MpbookError(f"--dtype {request.dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
    if request.max_new_tokens < 0:
        raise MpbookError(f"--max-new-tokens {request.max_new_tokens}: use 0 (a forward pass) or more")
    if request.microbatches < 1:
        raise MpbookError(f"--microbatches {request.microbatches}: use at least 1")
    prompts = request.prompts
    if len(prompts) < layout.dp:
        raise MpbookError(
            f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''} for dp={layout.dp} replicas: "
            f"give at least {layout.dp} prompts, or use dp <= {len(prompts)}"
        )
    smallest = min(len(r) for r in split_batch(len(prompts), layout.dp))
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


def run(
    wb: Workbench,
    prompts: Sequence[str],
    *,
    strategy: str,
    model: str = "tiny",
    dp: int | None = None,
    pp: int | None = None,
    tp: int | None = None,
    microbatches: int = 1,
    max_new_tokens: int = 32,
    dtype: str = "float32",
    stage_sizes: Sequence[int] | None = None,
    on_tick: Callable[[], None] | None = None,
    dashboard=None,
    track_tensors: bool = False,
) -> RunResult:
    """Generate (or, with ``max_new_tokens=0``, run a forward pass) with one layout.

    ``dashboard``: True for a live dashboard of the loading and the run (one dashboard for
    both), or a :class:`mpbook.dashboard.Dashboard` to feed."""
    from . import models

    if isinstance(prompts, str):
        prompts = [prompts]
    layout = choose_layout(strategy, wb.world_size, dp=dp, pp=pp, tp=tp)
    config = models.load_config(model)
    tokenizer = models.load_tokenizer(model)
    request = Request(
        model=str(model),
        layout=layout,
        prompts=tuple(prompts),
        max_new_tokens=max_new_tokens,
        microbatches=microbatches,
        dtype=dtype,
        stage_sizes=tuple(stage_sizes) if stage_sizes else None,
        track_tensors=track_tensors,
    )
    check_prompts(request.prompts)
    # Tokenized once here: the checks, the memory plan and the result all need the lengths.
    prompt_tokens = [len(ids) for ids in tokenizer(list(request.prompts))["input_ids"]]
    check(request, strategy=strategy, config=config, prompt_tokens=prompt_tokens)
    check_memory(wb, request, config=config, prompt_len=max(prompt_tokens))
    if wb.device_type == "cuda" and DTYPES[dtype] == "bfloat16":
        supported = wb.apply(_bf16_supported, ranks=[0], stream=False, what="checking the dtype")[0]
        if not supported:
            raise MpbookError("--dtype bfloat16: these GPUs do not support it; use float16 or float32")
    if dashboard is True:
        from .dashboard import Dashboard

        dashboard = Dashboard(wb)
    watch = dict(on_tick=on_tick, dashboard=dashboard or None)
    try:
        loads = wb.apply(engine_side.prepare, request, what=f"loading {model}", **watch)
        outputs = wb.apply(engine_side.run, request, what=f"the {strategy} run", **watch)
    except RankError as exc:
        oom = [f for f in exc.failures if f.ename == "DeviceOutOfMemory"]
        if not oom:
            raise
        raise MpbookError(f"{oom[0].evalue}; {_layouts_that_fit(wb, request, config, max(prompt_tokens))}") from None
    return merge(
        outputs, strategy=strategy, request=request, tokenizer=tokenizer, prompt_tokens=prompt_tokens,
        load_seconds=[load["load_seconds"] for load in loads], device_type=wb.device_type,
    )


def check_memory(wb: Workbench, request: Request, *, config, prompt_len: int) -> None:
    """Ask the planner whether every rank fits its device before anything loads; if not,
    name the rank, the bytes it needs and has, and the layouts that would fit."""
    from . import models
    from .planner import plan

    if "pipeline" not in models.supported_strategies(config):
        # The planner reads Llama-family module trees; other architectures are not predicted
        # (a device out-of-memory on an engine is still reported with its rank and bytes).
        return
    engines = wb.status()
    if wb.device_type == "cuda":
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
        config, dp=layout.dp, pp=layout.pp, tp=layout.tp, batch=len(request.prompts), prompt_len=prompt_len,
        max_new_tokens=request.max_new_tokens, dtype=DTYPES[request.dtype], microbatches=request.microbatches,
        stage_sizes=request.stage_sizes, device_memory_bytes=free,
    )
    if predicted.fits:
        return
    worst = max((r for r in predicted.ranks if not r.fits), key=lambda r: r.total)
    fitting = [str(s.layout) for s in predicted.suggestions if s.fits]
    gib = 1024**3
    where = "shared by the engines on this host" if wb.device_type == "cpu" else "free on its device"
    advice = (
        f"layouts that fit on {wb.world_size} engines: {'; '.join(fitting)}" if fitting
        else f"no layout of {wb.world_size} engines fits: use more devices, a smaller dtype, fewer prompts or fewer new tokens"
    )
    raise MpbookError(
        f"out of memory (predicted): rank {worst.rank} needs {worst.total / gib:.2f} GiB (weights {worst.weights / gib:.2f} "
        f"+ KV cache {worst.kv_cache / gib:.2f} + activations {worst.activations / gib:.2f}) but has "
        f"{free[worst.rank] / gib:.2f} GiB {where}; {advice}"
    )


def _layouts_that_fit(wb: Workbench, request: Request, config, prompt_len: int) -> str:
    try:
        check_memory(wb, request, config=config, prompt_len=prompt_len)
    except MpbookError as exc:  # the planner agrees it does not fit: its advice
        return str(exc).rsplit("; ", 1)[-1]
    return "fewer prompts or new tokens per run, or more engines, need less memory per device"


def _bf16_supported(state) -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def reference(model: str, prompts: Sequence[str], *, max_new_tokens: int, dtype: str = "float32"):
    """One device, plain transformers: the result every layout must reproduce.

    Returns (logits per prompt, generated ids per prompt); the same left padding and
    positions as the engines use, and transformers' own greedy ``generate``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from . import models

    from .generate import torch_dtype

    folder = models.resolve(model)
    tokenizer = models.load_tokenizer(model)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), attn_implementation="sdpa").eval()
    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    mask = batch.attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        logits = lm(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits.float()
        per_prompt = [logits[r, -int(mask[r].sum()):] for r in range(len(prompts))]
        tokens = []
        if max_new_tokens:
            out = lm.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            tokens = out[:, batch.input_ids.shape[1]:].tolist()
    return per_prompt, tokens
