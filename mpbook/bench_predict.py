"""``python -m mpbook bench --predict``: the speed model held to account.

On one cluster: calibrate it (:func:`mpbook.calibrate`, measured again unless ``kept``), then
for every layout of the engines that the model allows and that fits, the predicted decode
tokens/s (:mod:`mpbook.planner.speed`) beside the measured (the median of ``repeats`` runs
after a warm-up), and the error. The plan is made for what the run does: the prompts padded
to the longest, the default micro-batches.
"""

from __future__ import annotations

import statistics
from typing import Any


def bench_predict(*, models=("tiny", "small"), engines: int | None = None, cpu: bool = True, batch: int = 8,
                  new_tokens: int = 32, dtype: str = "float32", repeats: int = 3, kept: bool = False,
                  log=print) -> list[dict[str, Any]]:
    from . import models as presets
    from .bench import bench_prompts
    from .parallel.pipeline import default_microbatches
    from .planner import plan
    from .planner.calibrating import calibrate
    from .planner.suggestions import valid_layouts
    from .workbench import Workbench

    prompts = bench_prompts(batch)
    records: list[dict[str, Any]] = []
    with Workbench.start(engines, cpu=cpu) as wb:
        configs = {m: presets.PRESETS[m]() if m in presets.PRESETS else presets.load_config(m) for m in models}
        families = tuple(dict.fromkeys(c.get_text_config(decoder=True).model_type for c in configs.values()))
        calibration = calibrate(wb, dtype=dtype, model_types=families, again=not kept, log=log)
        log(calibration.summary())
        for model, config in configs.items():
            for layout in valid_layouts(config, wb.world_size, batch=batch):
                microbatches = default_microbatches(layout.pp, batch // layout.dp)
                dims = dict(dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep)

                def run():
                    return wb.generate(prompts, strategy=layout.strategy, model=model, **dims, dtype=dtype,
                                       microbatches=microbatches, max_new_tokens=new_tokens, ignore_eos=True)

                first = run()  # loads the model, touches its memory
                predicted = plan(config, **dims, batch=batch, prompt_len=max(first.prompt_tokens),
                                 max_new_tokens=new_tokens, dtype=dtype, microbatches=microbatches, engines=wb,
                                 calibration=calibration, suggestions=False)
                if not predicted.fits:
                    continue
                measured = statistics.median(run().decode_tokens_per_s for _ in range(repeats))
                speed = predicted.speed
                record = dict(model=model, layout=str(layout), microbatches=microbatches, engines=wb.world_size,
                              predicted_tok_s=speed.decode_tokens_per_s, measured_tok_s=measured,
                              error=speed.decode_tokens_per_s / measured - 1, bound=speed.bound)
                records.append(record)
                log(f"  {model:<6} {str(layout):<22} m={microbatches}: predicted {record['predicted_tok_s']:8.1f} "
                    f"tok/s, measured {measured:8.1f} ({record['error']:+.0%}); {speed.bound}")
    if records:
        worst = max(records, key=lambda r: abs(r["error"]))
        log(f"largest error {worst['error']:+.0%} ({worst['model']}, {worst['layout']}); "
            f"median |error| {statistics.median(abs(r['error']) for r in records):.0%} over {len(records)} layouts")
    return records

