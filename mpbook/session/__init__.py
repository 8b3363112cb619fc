"""Client side of inference: choose and check the layout, resolve the model once, dispatch.

Every check here runs before any engine does work, and each error names the numbers and the
valid choices. A model is resolved once per session (its folder, config and tokenizer are
kept), so a cell on a model already loaded costs the client only its own work. The engines
then load their part of the model (kept for the next run with the same model and layout) and
run :func:`mpbook.engine.decode.run`.

- :mod:`.run`: :class:`Session`, a strategy run from its arguments to its merged result;
- :mod:`.model_info`: what the client knows of a model, resolved once;
- :mod:`.prompts`: prompts checked and encoded (plain, or through the chat template);
- :mod:`.layout_choice`: the layout of a run, checked against model, prompts and engines;
- :mod:`.memory_check`: each rank's bytes against the planner's prediction, and the layouts
  that need less after a device ran out.
"""

from .run import Session

__all__ = ["Session"]
