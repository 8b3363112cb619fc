"""The entry point, :func:`plan`: check the arguments, read the model, predict every rank."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..compat import transformers as hf_compat
from ..errors import MpbookError
from ..layout import Layout
from ..options import check_dtype
from ..protocol import DEFAULT_MAX_NEW_TOKENS
from ..models.support import layout_problems
from .placement import Device, devices_for, engine_count
from .memory_plan import MemoryPlan
from .calibration import Calibration, kept_calibration
from .model_tensors import ModelTensors, model_tensors
from .ranks import PlannedModel, fit, ranks_memory
from .speed import predict as predict_speed
from .suggestions import suggest, valid_layouts
from .workload import ATTENTION, checked_workload


def plan(
    model,
    /,
    *,
    dp: int = 1,
    pp: int = 1,
    tp: int = 1,
    ep: int = 1,
    batch: int = 1,
    prompt_len: int = 128,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    dtype=None,
    microbatches: int = 1,
    stage_sizes: Sequence[int] | None = None,
    attention: str | None = None,
    device_memory_bytes: int | Sequence[int] | None = None,
    engines=None,
    tensors: ModelTensors | None = None,
    suggestions: bool = True,
    plans: dict | None = None,
    calibration: Calibration | None = None,
    devices: Sequence[Device] | None = None,
) -> MemoryPlan:
    """Predict each rank's memory for running ``model`` on a (dp, pp, tp, ep) layout.

    ``model``: a transformers config (which plans offline), a model name that
    :func:`mpbook.models.load_config` understands ("tiny", a ``save_pretrained`` folder, a hub
    id: only its ``config.json`` is fetched), or a loaded model (its config and dtype are
    used). Nothing is loaded: the module tree is built on the meta device.

    ``batch`` prompts, each padded to ``prompt_len`` tokens, generate ``max_new_tokens`` more
    (0: one forward pass returning every position's logits). ``microbatches`` cut each
    replica's prompts for the pipeline. ``dtype``: float32 (default; a loaded model's own
    dtype), bfloat16 or float16. ``attention``: "sdpa" (default; a fused kernel) or "eager".
    ``ep``: expert-parallel ranks (a mixture-of-experts model's experts split over them).
    ``plans``: parallel plans a user gives in the config's format (``{"tp": {...}}``), as the
    engines are given them.

    Fit is judged against ``devices`` when given (an earlier plan's ``devices``: the same
    engines, not asked again), else against ``device_memory_bytes`` (one size, or one per rank) when given;
    else the engines' free memory when ``engines`` is a Workbench; else this machine's free
    GPU memory (NVML) or, without enough GPUs, its available host memory, which CPU engines
    share. ``engines`` (a count or a Workbench) must equal dp * pp * tp * ep, and the suggestions
    cover every layout over that many engines.

    Per rank, with b the rows of one micro-batch, q the query tokens (the prompt in the
    prefill, 1 in a decode step), k the key length, e bytes per element, and heads, KV heads
    and the MLP width divided by tp:

    - weights: the rank's own parameters and buffers of the meta-built model, cut as the
      engines cut it (:mod:`mpbook.models.parts`: the model's own plans; exact);
    - KV cache: 2 x layers of the stage x rows of the replica x (prompt + new tokens - 1: the
      last new token is never fed back; or the sliding window) x KV heads/tp (all of them where
      the plan gathers attention; ep replicates attention) x head_dim x e
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

    Speed: with ``calibration`` (what :func:`mpbook.calibrate` measured on the engines), or
    when ``engines`` is a Workbench that was calibrated before, the plan's ``speed`` predicts
    the layout's decode and prefill tokens/s and each rank's decode step by part
    (:mod:`mpbook.planner.speed`, which shows its arithmetic); else ``speed`` is None.

    What the model holds is read once per (config, dtype) and kept (see
    :func:`mpbook.planner.model_tensors`), so planning again before every cell costs
    milliseconds; a caller that keeps it itself passes it as ``tensors``.
    """
    try:
        config, loaded, label = _resolve(model)
        dtype = check_dtype(dtype if dtype is not None else _own_dtype(loaded))
        if attention is None:
            attention = hf_compat.attn_implementation(config) if loaded is not None else None
            attention = attention if attention in ATTENTION else "sdpa"
        work = checked_workload(
            config, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens, microbatches=microbatches,
            dtype=dtype, attention=attention, stage_sizes=stage_sizes,
        )
        layout = checked_layout(config, dp=dp, pp=pp, tp=tp, ep=ep, engines=engines, plans=plans, work=work)

        planned = PlannedModel.read(
            config, _checked_tensors(tensors, config, dtype) or model_tensors(config, dtype, plans), plans)
        if devices is not None:
            devices, source = _checked_devices(devices, layout.world_size), "as an earlier plan found them"
        else:
            devices, source = devices_for(engines, device_memory_bytes, layout.world_size)
        ranks = fit(ranks_memory(planned, layout, work), devices)
        if calibration is None and hasattr(engines, "status"):
            calibration = kept_calibration(engines, dtype)
        return MemoryPlan(
            model=label,
            architecture=planned.tensors.architecture,
            layout=layout,
            workload=work,
            ranks=ranks,
            memory_source=source,
            # Every layout over the engines, planned too: a caller that only asks "does it fit?"
            # (the session, before every cell) leaves them out and asks plan.suggest() if not.
            suggestions=suggest(planned, work, layout.world_size, devices) if suggestions else [],
            speed=predict_speed(planned, layout, work, ranks, calibration) if calibration is not None else None,
            _model=planned,
            _devices=devices,
        )
    except MpbookError as exc:
        # Bad input: the caller's own line is what matters, not the planner's frames on the way
        # to the check that found it.
        raise exc.with_traceback(None) from None


def checked_layout(config, *, dp: int, pp: int, tp: int, ep: int, engines, plans=None, work=None) -> Layout:
    """The layout asked for, or one MpbookError with everything wrong with it: the model's
    limits first (stages, heads, experts), then the engine count, and then the layouts over
    those engines that the model and the workload allow."""
    try:
        layout = Layout(dp, pp, tp, ep)
    except ValueError as exc:
        raise MpbookError(str(exc)) from None
    stage_sizes = work.stage_sizes if work is not None else None
    problems = layout_problems(config, layout, plans, stage_sizes=stage_sizes)
    count = engine_count(engines)
    if count is not None and layout.world_size != count:
        problems.append(f"{layout} uses {layout.world_size} engines but there are {count}")
        batch, microbatches = (work.batch, work.microbatches) if work is not None else (None, 1)
        valid = [str(x) for x in valid_layouts(config, count, batch=batch, plans=plans, microbatches=microbatches,
                                              stage_sizes=stage_sizes)]
        problems.append(
            f"layouts of {count} engines valid for this model{'' if batch is None else f' and batch={batch}'}: "
            + ("; ".join(valid) if valid else "none")
        )
    if problems:
        raise MpbookError("; ".join(problems))
    return layout


def _checked_devices(devices: Sequence[Device], world: int) -> list[Device]:
    devices = list(devices)
    if len(devices) != world or not all(isinstance(d, Device) for d in devices):
        raise MpbookError(f"devices= holds {len(devices)} entries for {world} ranks; give an earlier plan's .devices "
                          "for the same number of engines")
    return devices


def _checked_tensors(tensors: ModelTensors | None, config, dtype: str) -> ModelTensors | None:
    """Tensors a caller kept: they must be of this dtype and this many layers."""
    if tensors is None:
        return None
    if not isinstance(tensors, ModelTensors):
        raise MpbookError(f"tensors= got a {type(tensors).__name__}; give mpbook.planner.model_tensors(config, dtype)")
    layers = config.num_hidden_layers
    if tensors.dtype != dtype or len(tensors.layers) != layers:
        raise MpbookError(
            f"tensors= holds {len(tensors.layers)} layers in {tensors.dtype}, the plan is for {layers} layers in "
            f"{dtype}; give mpbook.planner.model_tensors(config, {dtype!r}) for this model"
        )
    return tensors


def _own_dtype(loaded) -> str:
    """A loaded model's own precision; float32 for a config or a name."""
    if loaded is not None and hasattr(loaded, "dtype"):
        return str(loaded.dtype).removeprefix("torch.")
    return "float32"


def _resolve(model) -> tuple[Any, Any, str]:
    """(config, loaded model or None, label) from a config, a model name or folder, or a model."""
    from transformers import PretrainedConfig

    from .. import models

    if isinstance(model, PretrainedConfig):
        return model, None, getattr(model, "name_or_path", "") or type(model).__name__
    if hasattr(model, "config") and hasattr(model, "parameters"):
        return model.config, model, getattr(model.config, "name_or_path", "") or type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        # The preset needs no files: plan before anything is built or downloaded.
        config = models.PRESETS[name]() if name in models.PRESETS else models.load_config(name, asked=f"plan({name!r})")
        return config, None, name
    raise MpbookError(
        f"plan() got a {type(model).__name__}; give a transformers config, a model name or folder, or a loaded model"
    )
