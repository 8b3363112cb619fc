"""Calibrating a cluster: the probes of :mod:`mpbook.planner.calibration` on every engine, alone
and together, then checked against the engines' own decode of the built-in models (reference
runs, predicted by :mod:`mpbook.planner.speed` through :func:`mpbook.plan`); the result kept
on disk for the next time."""

from __future__ import annotations

from dataclasses import replace

from ..errors import MpbookError
from ..layout import Layout
from .calibration import (
    Calibration, host_times, read_kept, slowest_rates, slowest_host, cache_path, cluster_key, measure_links, measure_rates,
    warm_up,
)
from .workload import sample_prompts


def calibrate(engines, *, dtype: str = "float32", model_types=("llama",), again: bool = False,
              log=None) -> Calibration:
    """Measure the cluster ``engines`` (a Workbench) once, or read what it measured before.

    ``model_types``: the families whose host time per layer is measured (a few seconds each);
    a kept calibration without one of them measures only that one and keeps it too.
    ``again``: measure everything again (the machine changed, or it was busy).
    """
    from datetime import datetime, timezone

    from ..options import check_dtype

    if not hasattr(engines, "apply"):
        raise MpbookError("calibrate() needs a running cluster: give engines=wb (Workbench.start(...))")
    dtype = check_dtype(dtype)
    key, facts = cluster_key(engines, dtype)
    path = cache_path(key)
    kept = None if again else read_kept(path)
    wanted = tuple(dict.fromkeys(model_types))
    if kept is not None and all(kept.has_host_time(t) for t in wanted):
        return kept
    missing = wanted if kept is None else tuple(t for t in wanted if not kept.has_host_time(t))
    say = log or (lambda _: None)
    engines.apply(warm_up, model_types=missing, stream=False)
    if kept is None:
        say(f"calibrating {engines.world_size} engines ({facts['device']}, {dtype}): one engine alone, then all at once")
        alone = engines.apply(measure_rates, dtype=dtype, model_types=missing, ranks=[0], stream=False)[0]
        together = engines.apply(measure_rates, dtype=dtype, model_types=missing, stream=False)
        links = engines.apply(measure_links, stream=False)[0]
        calibration = Calibration(
            key=key, ranks=engines.world_size, alone=alone, together=slowest_rates(together),
            all_reduce=links and links["all_reduce"],
            send=links and links["send"], measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **facts)
        calibration = _reference_runs(engines, calibration, say)
    else:
        say(f"calibrating the host time of {', '.join(missing)}")
        alone = engines.apply(host_times, model_types=missing, ranks=[0], stream=False)[0]
        together = slowest_host(engines.apply(host_times, model_types=missing, stream=False))
        calibration = replace(kept, alone=replace(kept.alone, host={**kept.alone.host, **alone}),
                              together=replace(kept.together, host={**kept.together.host, **together}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration.to_json())
    return calibration


REFERENCE_MODEL = "tiny"  # built in, offline, a Llama: the family whose probe sets the factor
WEIGHTS_MODEL = "small"  # built in too, 100 MB of float32 weights: more than the caches hold
# The workload the reference runs decode: the default one of `explore` and `bench --predict` (8
# prompts, one row an engine at least, 32 new tokens). The fits below absorb what the model
# leaves out (a collective's wait for its slowest peer grows with the rows), so they are made
# where they are used most: fitted at 16 rows on 4 engines, tp=4 at 8 rows ran 1.3x as fast
# as predicted.
REFERENCE_BATCH = 8
REFERENCE_NEW_TOKENS = 32
REFERENCE_REPEATS = 3


def _reference_runs(engines, calibration: Calibration, say) -> Calibration:
    """The probes against the real thing: the built-in models decoding through the engines' own
    loop, measured by their step breakdown (:mod:`mpbook.engine.steps`) and predicted from the
    probes. Data parallel over every engine at once: ``tiny`` (whose matrices are small: its
    step is host time) gives the ratio of the host parts, the engines' own cost beyond the probe
    (their telemetry and streaming, their threads sharing the interpreter); ``small`` (100 MB of
    weights) then the ratio of the weights' streaming (a model's own matrix shapes and kernels
    against the probe's square ones). Then, for each tensor-parallel group size ``tiny`` allows,
    both models as replicas of such groups over every engine give an all-reduce's time inside a
    real step (the ranks arrive apart, and the wait is part of the call; the mean of the two
    fits: one with little compute between the calls, one with much), and ``tiny`` as a pipeline of one stage
    per engine a hop's time (the send, the stage's schedule around it, the wait for the next
    stage): each the value at which the prediction of that run equals its measured tokens/s.
    The engines then hold ``tiny`` (a later run of another model loads it again)."""
    from ..models.presets import PRESETS
    from ..parallel.pipeline import layout_microbatches
    from .predict import plan

    world = engines.world_size
    say(f"calibrating against {REFERENCE_MODEL} decoding on {world} engine{'s' if world > 1 else ''}")
    prompts = sample_prompts(max(REFERENCE_BATCH, world))
    config = PRESETS[REFERENCE_MODEL]()

    def run(model, **layout):
        """The median of a few runs (these machines' speed moves from one second to the next),
        and the prediction of that run from a calibration."""
        shape = Layout(**layout)
        microbatches = layout_microbatches(shape, len(prompts), engines.cluster.ranks_at_once)
        common = dict(strategy=shape.strategy, model=model, dtype=calibration.dtype, ignore_eos=True,
                      microbatches=microbatches, **layout)
        engines.generate(prompts, max_new_tokens=4, **common)  # loads it, touches its memory
        runs = sorted((engines.generate(prompts, max_new_tokens=REFERENCE_NEW_TOKENS, **common)
                       for _ in range(REFERENCE_REPEATS)), key=lambda r: r.decode_seconds)
        result = runs[len(runs) // 2]

        def predicted(calibrated: Calibration):
            return plan(PRESETS[model](), **layout, batch=len(prompts), prompt_len=max(result.prompt_tokens),
                        max_new_tokens=REFERENCE_NEW_TOKENS, dtype=calibration.dtype, microbatches=microbatches,
                        calibration=calibrated, device_memory_bytes=1 << 40, suggestions=False).speed

        return result, predicted

    # Each factor is the one at which the run's predicted decode tok/s equals its measured: the
    # decode's time holds more than its steps' breakdown (the loop around the steps), and
    # factors fitted to the breakdown alone predicted the very run they came from 26% fast.
    result, predicted = run(REFERENCE_MODEL, dp=world)
    calibration = replace(calibration, engine_factor=fitted(
        lambda f: predicted(replace(calibration, engine_factor=f)).decode_tokens_per_s,
        result.decode_tokens_per_s, low=FACTORS[0], high=FACTORS[1]) or FACTORS[0])
    result, predicted = run(WEIGHTS_MODEL, dp=world)
    calibration = replace(calibration, weights_factor=fitted(
        lambda f: predicted(replace(calibration, weights_factor=f)).decode_tokens_per_s,
        result.decode_tokens_per_s, low=FACTORS[0], high=FACTORS[1]) or FACTORS[0])
    in_step = {}
    for group in tensor_groups(world, config.num_key_value_heads):
        fits = []
        for model in (REFERENCE_MODEL, WEIGHTS_MODEL):  # little compute between the calls, and much
            result, predicted = run(model, dp=world // group, tp=group)
            fits.append(fitted(
                lambda s: predicted(replace(calibration, step_all_reduce_s={group: s})).decode_tokens_per_s,
                result.decode_tokens_per_s))
        say(f"an all-reduce over {group} inside a decode step: "
            + ", ".join(f"{'-' if f is None else f'{f * 1e6:.0f} us'} fitted on {m}"
                        for f, m in zip(fits, (REFERENCE_MODEL, WEIGHTS_MODEL))))
        fits = [f for f in fits if f is not None]
        if fits:
            in_step[group] = _mean(fits)
    calibration = replace(calibration, step_all_reduce_s=in_step)
    if 1 < world <= config.num_hidden_layers:
        result, predicted = run(REFERENCE_MODEL, pp=world)
        calibration = replace(calibration, step_send_s=fitted(
            lambda s: predicted(replace(calibration, step_send_s=s)).decode_tokens_per_s,
            result.decode_tokens_per_s))
    return calibration


def tensor_groups(world: int, kv_heads: int) -> list[int]:
    """The tensor-parallel group sizes the reference model can run on ``world`` engines (every
    engine busy: ``world / group`` replicas of each)."""
    return [g for g in range(2, world + 1) if world % g == 0 and kv_heads % g == 0]


FIT_MAX_S = 0.1  # no collective or hop inside a step is priced above this
FACTORS = (0.25, 20.0)  # the probes' host time and time per weight byte are scaled within this


def fitted(predicted_tokens_per_s, measured_tokens_per_s: float, *, low: float = 0.0,
           high: float = FIT_MAX_S) -> float | None:
    """The value ``s`` in [``low``, ``high``] at which ``predicted_tokens_per_s(s)`` (which falls
    as ``s`` grows) equals what was measured, by bisection (``high`` where even that predicts
    faster); None when ``low`` already predicts no faster than measured (for a collective's or
    a hop's seconds: the back-to-back figures stand)."""
    if predicted_tokens_per_s(low) <= measured_tokens_per_s:
        return None
    if predicted_tokens_per_s(high) > measured_tokens_per_s:
        return high
    for _ in range(40):  # (high - low) / 2**40: far below what was measured
        middle = (low + high) / 2
        if predicted_tokens_per_s(middle) > measured_tokens_per_s:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
