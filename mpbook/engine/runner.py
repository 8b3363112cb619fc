"""This rank's part of a model, loaded once and kept on the engine between runs.

A :class:`Runner` holds one pipeline stage (all layers when pp=1), tensor-parallel over its
tp group when tp>1; :func:`prepare` loads it for a request's model and layout, or reuses the
one already loaded.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..layout import Coords, Mesh
from ..parallel.pipeline import StagePeers, split_layers
from ..protocol import DTYPES, Request


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, stop) of a vocabulary of ``total`` tokens, and the group
    (the tp group of the last stage) whose ranks hold the other slices, in slice order."""

    start: int
    stop: int
    total: int
    group: Any


@dataclass
class Runner:
    """This rank's stage of a layout, kept on the engine between runs."""

    key: tuple
    stage: Any  # the causal LM holding this rank's layers
    peers: StagePeers
    coords: Coords
    mesh: Mesh | None
    device: Any
    dtype: Any
    weight_bytes: int
    load_seconds: float
    whole: bool = False  # an architecture mpbook cannot cut: the whole model, data parallel only
    # The vocabulary slice of this rank's logits when the LM head is split over tp
    # (vocab-parallel); None when every rank of the last stage has the full logits.
    vocab: VocabShard | None = None

    @property
    def hidden_size(self) -> int:
        return self.stage.config.hidden_size

    @property
    def vocab_size(self) -> int:
        """The full width of the logits (the model config's vocab_size)."""
        return self.stage.config.get_text_config().vocab_size

    def new_cache(self):
        """An empty KV cache for this stage's layers (one per micro-batch)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.stage.config)

    def forward(self, x, attention_mask, position_ids, cache, *, all_logits: bool):
        """One stage forward: token ids (first stage) or hidden states in; hidden states or
        logits (last stage) out."""
        if self.whole:
            out = self.stage(input_ids=x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             use_cache=True, logits_to_keep=0 if all_logits else 1)
            return out.logits
        body = self.stage.model
        inputs = {"input_ids": x} if self.peers.first else {"inputs_embeds": x}
        hidden = body(**inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        hidden = hidden.last_hidden_state
        if not self.peers.last:
            return hidden
        # Generation needs only the last position's logits (what transformers does too).
        return self.stage.lm_head(hidden if all_logits else hidden[:, -1:, :])

    def close(self) -> None:
        self.peers.drop_pending()  # a live gloo Work keeps its connection open
        self.stage = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def param_bytes(module) -> int:
    """Bytes of the parameters this rank holds (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _build_runner(state, request: Request) -> Runner:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from .. import models
    from ..parallel import tensor

    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    layout = request.layout
    coords = layout.coords(state.rank)
    config = AutoConfig.from_pretrained(models.resolve(request.model))
    whole = "pipeline" not in models.supported_strategies(config)
    if whole:
        stage = models.load_whole(request.model, dtype=torch_dtype(request.dtype), device=state.device)
    else:
        stages = split_layers(config.num_hidden_layers, layout.pp, request.stage_sizes)
        stage = models.load_stage(
            request.model,
            layers=stages[coords.pp],
            first=coords.pp == 0,
            last=coords.pp == layout.pp - 1,
            dtype=torch_dtype(request.dtype),
            device=state.device,
            tp_rank=coords.tp,
            tp=layout.tp,
        )
    mesh = None
    if layout.tp > 1:
        # One mesh per layout for the engine's lifetime: its subgroups are made once (a
        # collective step) and reused when a later run comes back to the same layout.
        meshes = state.cache.setdefault("meshes", {})
        mesh = meshes.get(layout) or meshes.setdefault(layout, Mesh(layout, state.rank, state.device.type))
        tensor.connect(stage, mesh.group("tp"), state.telemetry)
    return Runner(
        key=request.model_key,
        stage=stage,
        peers=StagePeers(layout.group_ranks("pp", state.rank), coords.pp, state.telemetry),
        coords=coords,
        mesh=mesh,
        device=state.device,
        dtype=torch_dtype(request.dtype),
        weight_bytes=param_bytes(stage),
        load_seconds=time.perf_counter() - began,
        whole=whole,
    )


class DeviceOutOfMemory(RuntimeError):
    """A device ran out of memory on this rank; the engine freed what it could and stays up."""


@contextlib.contextmanager
def _out_of_memory_reported(state) -> Iterator[None]:
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
        runner = state.cache.pop("runner", None)
        if runner is not None:
            runner.close()  # free this rank's model: the next run reloads it
        del exc  # its traceback holds the frames, and they hold the tensors
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(state.device)
        gib = 1024**3
        raise DeviceOutOfMemory(
            f"out of memory on rank {state.rank} ({state.device}): asked for {asked.group(1) if asked else 'more'}, "
            f"{free / gib:.2f} GiB free of {total / gib:.2f} GiB"
        ) from None


def prepare(state, request: Request) -> dict:
    """Load this rank's part of the model for ``request``'s layout, unless already loaded."""
    with _out_of_memory_reported(state):
        return _prepare(state, request)


def _prepare(state, request: Request) -> dict:
    runner = state.cache.get("runner")
    if runner is not None and runner.key == request.model_key:
        return {"weight_bytes": runner.weight_bytes, "load_seconds": 0.0, "reused": True}
    if runner is not None:
        state.cache.pop("runner").close()  # free the old layout's memory before loading
    with state.telemetry.phase_scope("loading"):
        runner = state.cache["runner"] = _build_runner(state, request)
    # The ranks of one replica (its stages and shards) work on the same tokens: the
    # dashboard counts each replica's tokens once.
    state.telemetry.replica = runner.coords.dp
    state.telemetry.note_memory("weights", runner.weight_bytes)
    return {"weight_bytes": runner.weight_bytes, "load_seconds": runner.load_seconds, "reused": False}


