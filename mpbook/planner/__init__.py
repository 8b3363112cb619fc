"""Will it fit? Per-rank memory of a (dp, pp, tp, ep) layout, predicted before anything loads.

Weights are read off the model's real module tree, built on the meta device (shapes and
dtypes, no memory), and cut exactly as the engines cut it, by the same module
(:mod:`mpbook.models.structure`, which reads the model's own parallel plans): contiguous
decoder layers per pipeline stage (:func:`mpbook.parallel.pipeline.split_layers`), the
embedding on the first stage, the final norm and LM head on the last, inside each layer what
the tp plan splits over the tensor-parallel ranks, the experts over the expert-parallel ones,
and the vocabulary (embedding and head) over tp. So a model with biases, untied embeddings, an
explicit head_dim or experts is counted as it is, not by formula.
The KV cache and the activations follow from the shapes of the workload.

The modules, in the order a plan is made:

- ``predict``: :func:`plan`, the entry point: checks the arguments, then asks the others;
- ``model_tensors``: what the model holds (its tensors grouped by where a stage keeps them);
- ``workload``, ``kv_cache``, ``activations``: what a run adds;
- ``ranks``: one rank's share of both, and whether it fits its device;
- ``placement``: where each rank runs and the memory it may take (given, the engines', this machine's);
- ``suggestions``: the other layouts over the same engines;
- ``memory_plan``, ``rendering``: the result, and it as a table, HTML and the arithmetic.

>>> p = plan("tiny", pp=2, tp=2, batch=4, prompt_len=32, max_new_tokens=16)  # doctest: +SKIP
>>> print(p)                                                                  # doctest: +SKIP
"""

from .placement import Device
from .memory_plan import MemoryPlan
from .model_tensors import ModelTensors, model_tensors
from .predict import plan
from .ranks import RankMemory, fit
from .suggestions import Suggestion, layouts
from .workload import Workload

__all__ = [
    "Device", "MemoryPlan", "ModelTensors", "RankMemory", "Suggestion", "Workload", "fit", "layouts", "model_tensors",
    "plan",
]
