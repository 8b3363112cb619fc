"""Will it fit? Per-rank memory of a (dp, pp, tp) layout, predicted before anything loads.

Weights are read off the model's real module tree, built on the meta device (shapes and
dtypes, no memory), and cut exactly as the strategies cut it: contiguous decoder layers per
pipeline stage (:func:`mpbook.parallel.pipeline.split_layers`), the embedding on the first
stage, the final norm and LM head on the last, and inside each layer the projections of
:data:`mpbook.parallel.tensor.LAYER_PLAN` split over the tensor-parallel ranks. So a model
with biases, untied embeddings or an explicit head_dim is counted as it is, not by formula.
The KV cache and the activations follow from the shapes of the workload.

The modules, in the order a plan is made:

- ``predict``: :func:`plan`, the entry point: checks the arguments, then asks the others;
- ``model_tensors``: what the model holds (its tensors grouped by where a stage keeps them);
- ``workload``, ``kv_cache``, ``activations``: what a run adds;
- ``ranks``: one rank's share of both;
- ``devices``: the memory each rank may take (given, the engines', this machine's);
- ``suggestions``: the other layouts over the same engines;
- ``memory_plan``, ``rendering``: the result, and it as a table, HTML and the arithmetic.

>>> p = plan("tiny", pp=2, tp=2, batch=4, prompt_len=32, max_new_tokens=16)  # doctest: +SKIP
>>> print(p)                                                                  # doctest: +SKIP
"""

from .devices import Device, fit
from .memory_plan import MemoryPlan
from .model_tensors import ModelTensors, model_tensors
from .predict import plan
from .ranks import RankPlan
from .suggestions import Suggestion, layouts
from .workload import Workload

__all__ = [
    "Device", "MemoryPlan", "ModelTensors", "RankPlan", "Suggestion", "Workload", "fit", "layouts", "model_tensors",
    "plan",
]
