"""``--compile``: a static KV cache and ``torch.compile`` of the decode step.

An eager decode step runs the family's forward op by op, the Python of every module on every
step; on a small model or a CPU that Python is a large part of the step. ``torch.compile``
turns the step into a few generated kernels, and needs fixed shapes to do it once: so the KV
cache is transformers' :class:`~transformers.StaticCache` (allocated for the whole generation
up front, written in place) and the attention mask has the cache's full length, its unused
columns zero. The prefill stays eager (it runs once per cell, at a new length each time).

What is compiled, and when:

- The step function of each rank's stage (:meth:`mpbook.models.loading.Stage.forward`, one
  token per row), with ``dynamic=False``: one graph per (rows, cache length). The cache
  length is rounded up to a multiple of :data:`LENGTH_STEP`, so cells with prompts of similar
  lengths share a graph.
- The collectives inside the forward (tensor and expert parallel) are not traced
  (:mod:`mpbook.parallel.collectives` marks them): the step is compiled in pieces around them,
  every rank of the group calls them in the same order as in eager mode.
- Compiling happens before the run's prefill, in a phase of its own ("compiling"), on a
  scratch step over every micro-batch's cache: every rank of a tp / ep group compiles the same
  shapes in the same order, so the collectives inside meet. Its time is the result's
  ``compile_seconds``; the decode's tokens/s never include it.
- The caches and the compiled step stay on the engine with the model (:class:`CompiledDecode`
  on the runner), so the next cell of the same shape neither compiles nor allocates: it
  resets the caches. A cell of another shape compiles once more (torch.compile keeps both).

On a GPU the step also runs as a CUDA graph (``mode="reduce-overhead"``) when nothing inside
it is a collective (data parallel, or pipeline stages without tp / ep), since a graph cannot
contain mpbook's collectives.

Tokens are the eager path's: the same kernels' arithmetic up to float rounding, checked
against one device and against eager in the tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import MpbookError

# Cache lengths are rounded up to this, so that prompts of similar lengths reuse a graph.
LENGTH_STEP = 64
# Graphs torch.compile may keep for the step's code. Every loaded model's step is the same
# code to dynamo, so every model, layout, stage and shape of a session adds its graphs to one
# list. At dynamo's default of 8 the ninth ran its steps eagerly, with only a warning on the
# engine's stderr (seen in `bench --compile`, 5 rounds of 3 layouts, when tensor parallel
# still compiled again at each load).
RECOMPILE_LIMIT = 256


def cache_length(prompt_width: int, max_new_tokens: int) -> int:
    """The static cache's length for a micro-batch: its prompt and every new token, rounded up."""
    needed = prompt_width + max_new_tokens
    return -(-needed // LENGTH_STEP) * LENGTH_STEP


def check_compilable(stage, *, model: str) -> None:
    """``--compile`` needs an attention KV cache that transformers can make static."""
    if stage.recurrent:
        raise MpbookError(
            f"--compile: {model} keeps a recurrent state (state-space or linear attention), not an attention KV "
            "cache that can be static; run it without --compile")


@dataclass
class CompiledDecode:
    """One rank's compiled decode step and its static caches, kept with the loaded model."""

    stage: Any  # this rank's models.loading.Stage
    device: Any
    collectives_inside: bool  # tp or ep: the step calls collectives (no CUDA graph then)
    step: Any = None  # the compiled stage forward, made by the first warm-up (torch.compile imports for seconds)
    caches: dict = field(default_factory=dict)  # (micro-batch index, rows, length) -> StaticCache
    # The caches that have been through the compiled step: the graph's guards know them (a new
    # cache object, even of a known shape, may compile again, so each is warmed up once).
    ready: set = field(default_factory=set)

    def compile(self):
        """The stage's one-token forward under torch.compile (compiled at its first call)."""
        import torch

        from ..compat.torch import allow_recompiles

        stage = self.stage
        mode = "reduce-overhead" if self.device.type == "cuda" and not self.collectives_inside else None
        allow_recompiles(RECOMPILE_LIMIT)

        def step(x, attention_mask, position_ids, cache):
            return stage.forward(x, attention_mask, position_ids, cache, logits_to_keep=1)

        compiled = torch.compile(step, dynamic=False, mode=mode)
        if mode is None:
            return compiled

        def graphed(*args):
            # A CUDA graph writes every replay's output into the same memory: each step is a
            # new step for the graph trees, and its output is copied out before micro-batch
            # after micro-batch replays the graph.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args).clone()

        return graphed

    def cache(self, index: int, rows: int, length: int):
        """Micro-batch ``index``'s static cache of ``rows`` x ``length``, reset, or a new one.

        Caches of another shape are let go first: a cell keeps at most one set."""
        key = (index, rows, length)
        if key not in self.caches:
            for other in [k for k in self.caches if k[1:] != (rows, length) or k[0] == index]:
                del self.caches[other]
                self.ready.discard(other)
            self.caches[key] = self.stage.new_cache(max_length=length)
        else:
            import torch

            with torch.inference_mode():  # its tensors were made in a run's inference mode
                self.caches[key].reset()
        return key, self.caches[key]

    def warm_up(self, microbatches, *, first: bool, hidden_size: int, dtype) -> float | None:
        """Compile for every micro-batch cache not seen yet; return the seconds it took, or
        None when every one was ready (the step was compiled in an earlier cell).

        Each new cache: one eager step (transformers allocates a static cache on its first
        write, outside the graph, so that its tensors keep a fixed address), then one compiled
        step, which compiles the first time a shape comes; then the cache is reset for the run."""
        import torch

        began = time.perf_counter()
        stage, device = self.stage, self.device
        new = [mb for mb in microbatches if mb.static_key not in self.ready]
        if new and self.step is None:
            self.step = self.compile()
        for mb in new:
            rows, length = mb.rows, mb.padded_mask.shape[1]
            x = (torch.zeros(rows, 1, dtype=torch.long, device=device) if first
                 else torch.zeros(rows, 1, hidden_size, dtype=dtype, device=device))
            # The micro-batch's own mask (read, never written here): a tensor made the same way
            # as the run's, or the graph's guards would not take the run's for it.
            mask = mb.padded_mask
            positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
            stage.forward(x, mask[:, :1], positions, mb.cache, logits_to_keep=1)
            self.step(x, mask, positions + 1, mb.cache)
            mb.cache.reset()
            self.ready.add(mb.static_key)
        return time.perf_counter() - began if new else None
