"""``python -m mpbook bench --predict``: the speed model held to account.

On one cluster, in ``repeats`` interleaved rounds: calibrate it (:func:`mpbook.calibrate`,
measured again each round; the first round reads a kept calibration when ``kept``), then run
every layout of the engines that the model allows and that fits (the median of three runs),
beside its decode tokens/s predicted from that round's calibration (:mod:`mpbook.planner.speed`). A layout's row
is the median of its rounds' predictions against the median of its measurements, and the error.
Each round's prediction and measurement are minutes apart, and the medians are over rounds
spread across the whole run: these machines' speed drifts (on the 2-core VM the same layout
measured 30% apart an hour later), and a prediction made from one calibration and compared
with measurements taken long after it measures the drift as much as the model. The plan is made
for what the run does: the prompts padded to the longest, the default micro-batches.
"""

from __future__ import annotations

import statistics
from typing import Any


RUNS_PER_ROUND = 3


def bench_predict(*, models=("tiny", "small"), engines: int | None = None, cpu: bool = True, batch: int = 8,
                  new_tokens: int = 32, dtype: str = "float32", repeats: int = 3, kept: bool = False,
                  log=print) -> list[dict[str, Any]]:
    from . import models as presets
    from .bench import bench_prompts
    from .parallel.pipeline import layout_microbatches
    from .planner import plan
    from .planner.calibrating import calibrate
    from .planner.suggestions import valid_layouts
    from .workbench import Workbench

    prompts = bench_prompts(batch)
    with Workbench.start(engines, cpu=cpu) as wb:
        configs = {m: presets.PRESETS[m]() if m in presets.PRESETS else presets.load_config(m) for m in models}
        families = tuple(dict.fromkeys(c.get_text_config(decoder=True).model_type for c in configs.values()))
        cases = [(model, layout) for model, config in configs.items()
                 for layout in valid_layouts(config, wb.world_size, batch=batch)]
        rounds: dict[Any, list[tuple[float, float, Any]]] = {case: [] for case in cases}
        chosen = {case: layout_microbatches(case[1], batch // case[1].dp, wb.cluster.ranks_at_once) for case in cases}
        for round_index in range(max(repeats, 1)):
            calibration = calibrate(wb, dtype=dtype, model_types=families, again=round_index > 0 or not kept, log=log)
            log(f"round {round_index + 1} of {repeats}: {calibration.summary()}")
            for model, layout in list(rounds):
                microbatches = chosen[(model, layout)]
                dims = dict(dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep)

                def run():
                    return wb.generate(prompts, strategy=layout.strategy, model=model, **dims, dtype=dtype,
                                       microbatches=microbatches, max_new_tokens=new_tokens, ignore_eos=True)

                if round_index == 0:
                    run()  # loads the model, touches its memory
                # The median of a few runs, as the calibration's reference runs take: a run of
                # `tiny` lasts a fraction of a second, and these machines' speed moves by a third
                # from one second to the next.
                runs = sorted((run() for _ in range(RUNS_PER_ROUND)), key=lambda r: r.decode_seconds)
                result = runs[len(runs) // 2]
                predicted = plan(configs[model], **dims, batch=batch, prompt_len=max(result.prompt_tokens),
                                 max_new_tokens=new_tokens, dtype=dtype, microbatches=microbatches, engines=wb,
                                 calibration=calibration, suggestions=False)
                if not predicted.fits:
                    del rounds[(model, layout)]
                    continue
                rounds[(model, layout)].append((predicted.speed.decode_tokens_per_s, result.decode_tokens_per_s,
                                                predicted.speed))
        records = [_record(model, layout, runs, wb.world_size, chosen[(model, layout)], log)
                   for (model, layout), runs in rounds.items()]
    if records:
        worst = max(records, key=lambda r: abs(r["error"]))
        log(f"largest error {worst['error']:+.0%} ({worst['model']}, {worst['layout']}); "
            f"median |error| {statistics.median(abs(r['error']) for r in records):.0%} over {len(records)} layouts")
    return records


def _record(model: str, layout, runs: list[tuple[float, float, Any]], engines: int, microbatches: int,
            log) -> dict[str, Any]:
    """One layout's row: the medians over its rounds, and each round's pair; what bounds it is
    said by the round whose prediction is the median (the lower middle one of an even count)."""
    predicted = statistics.median(p for p, _, _ in runs)
    measured = statistics.median(m for _, m, _ in runs)
    speed = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2][2]
    record = dict(model=model, layout=str(layout), microbatches=microbatches, engines=engines,
                  predicted_tok_s=predicted, measured_tok_s=measured, error=predicted / measured - 1,
                  bound=speed.bound, rounds=[dict(predicted_tok_s=p, measured_tok_s=m) for p, m, _ in runs])
    log(f"  {model:<6} {str(layout):<22} m={microbatches}: predicted {predicted:8.1f} tok/s, measured "
        f"{measured:8.1f} ({record['error']:+.0%}); {speed.bound}; rounds "
        + ", ".join(f"{p:.0f}/{m:.0f}" for p, m, _ in runs))
    return record
