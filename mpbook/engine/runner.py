"""This rank's part of a model, loaded once and kept on the engine between runs.

A :class:`Runner` holds one pipeline stage (all layers when pp=1), its tensor-parallel shards
when tp>1 and its experts when ep>1, as :mod:`mpbook.models.structure` reads them from the
model's own plans; its forward runs the family's own code (:class:`mpbook.models.loading.Stage`).
:func:`prepare` (called by :func:`mpbook.engine.decode.run`, inside its out-of-memory report) loads
it for a request's model and layout, or reuses the one already loaded.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..layout import Coords
from ..models.loading import Stage
from ..parallel.pipeline import StagePeers
from ..protocol import DTYPES, Request
from .state import engine_mesh
from .telemetry import device_memory


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, stop) of a vocabulary of ``total`` tokens, and the group
    (the tp group of the last stage) whose ranks hold the other slices, in slice order:
    a :class:`mpbook.parallel.collectives.Group`, which :func:`mpbook.parallel.vocab.gather_logits`
    and :func:`mpbook.parallel.vocab.greedy_tokens` take through this object."""

    start: int
    stop: int
    total: int
    group: Any


@dataclass
class Runner:
    """This rank's part of a layout, kept on the engine between runs."""

    key: tuple
    model: Any  # the causal LM, cut down to this rank's layers and shards
    peers: StagePeers
    coords: Coords
    device: Any
    dtype: Any
    weight_bytes: int
    load_seconds: float
    whole: bool = False  # nothing split (data parallel): the model as transformers loads it
    # The vocabulary slice of this rank's logits when the LM head is split over tp
    # (vocab-parallel); None when every rank of the last stage has the full logits.
    vocab: VocabShard | None = None
    stage: Stage | None = None  # what runs: the family's own forward on this stage (models.loading.Stage)
    # Every process group the model's collectives use, by dims. After the cluster's process
    # group is formed again (a failed collective, an interrupt), the model stays loaded and
    # these are pointed at the new groups (rebind) instead of the whole model reloading.
    groups: list = field(default_factory=list)  # (dims, mpbook.parallel.collectives.Group)
    stale: bool = False  # the groups belong to a process group that is gone
    # --compile: the compiled decode step and its static caches (mpbook.engine.compiled),
    # made by the first run that asks for it and kept for the next cells.
    compiled: Any = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        """The full width of the logits (the model config's vocab_size)."""
        return self.model.config.get_text_config().vocab_size

    @property
    def expert_load(self) -> dict:
        """MoE module -> routes that reached each of this rank's experts so far (expert parallel)."""
        return {} if self.stage is None else self.stage.expert_load

    def new_cache(self):
        """An empty KV cache for this stage's layers (one per micro-batch)."""
        return self.stage.new_cache()

    def forward(self, x, attention_mask, position_ids, cache, *, all_logits: bool):
        """One stage forward, the family's own code: token ids (first stage) or hidden states in;
        hidden states (batch, q, hidden) or, on the last stage, logits out: every position's
        (``all_logits``) or the last one's, (batch, q or 1, vocab_local). With a vocab-parallel
        head (``self.vocab`` set) they are this rank's slice of the vocabulary: the caller picks
        tokens with :func:`mpbook.parallel.vocab.greedy_tokens` or gathers them with
        :func:`mpbook.parallel.vocab.gather_logits`."""
        return self.stage.forward(x, attention_mask, position_ids, cache, logits_to_keep=0 if all_logits else 1)

    def detach(self) -> None:
        """Let go of the process groups (about to be destroyed); :meth:`rebind` takes new ones."""
        for _, group in self.groups:
            group.group = None
        self.peers.drop_pending()
        self.stale = True

    def rebind(self, state) -> None:
        """Point the model's collectives at this engine's current process groups."""
        mesh = engine_mesh(state, self.key[1])
        for dims, group in self.groups:  # the same order on every rank: new_group is collective
            group.group = mesh.group(*dims)
            group.comm = mesh.comm(*dims)  # the old communicators may hold messages out of step
        self.peers.drop_pending()
        self.peers.comm = state.mpi
        self.stale = False

    def close(self) -> None:
        self.peers.drop_pending()  # a live gloo Work keeps its connection open
        self.model = None
        self.stage = None
        self.compiled = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _build_runner(state, request: Request) -> Runner:
    began = time.perf_counter()  # the whole loading phase: the collectives' module imports here the first time
    from transformers.utils import logging as hf_logging

    from .. import models
    from ..parallel.collectives import Group

    hf_logging.disable_progress_bar()
    layout = request.layout
    coords = layout.coords(state.rank)
    dtype = torch_dtype(request.dtype)
    whole = layout.pp == layout.tp == layout.ep == 1
    groups: dict[tuple, Group] = {}
    if whole:
        # Nothing to split: transformers' own loader, whatever the family (data parallel works
        # for every causal LM, with the attention implementation transformers picks for it).
        stage = models.whole_stage(request.model, dtype=dtype, device=state.device, attention=request.attention)
    else:
        # One mesh per layout for the engine's lifetime: its subgroups are made once (a
        # collective step) and reused when a later run comes back to the same layout.
        mesh = engine_mesh(state, layout)

        def group(dims: tuple[str, ...]) -> Group:
            if dims not in groups:
                ranks = mesh.ranks(*dims)
                groups[dims] = Group(mesh.group(*dims), rank=ranks.index(state.rank), size=len(ranks),
                                     telemetry=state.telemetry, ranks=ranks, comm=mesh.comm(*dims))
            return groups[dims]

        stage = models.load_stage(
            request.model, layout=layout, coords=coords, dtype=dtype, device=state.device, group=group,
            stage_sizes=request.stage_sizes, plans=request.plans, attention=request.attention,
            telemetry=state.telemetry,
        )
    if state.device.type == "cpu":
        # Bit-for-bit copies onto 2 MiB pages: a CPU decode streams every weight each token.
        models.place_on_huge_pages(stage.model)
    vocab = None
    if stage.vocab is not None:
        start, stop = stage.vocab
        # The decode loop counts the vocabulary's collectives itself (it names them).
        vocab = VocabShard(start, stop, stage.structure.vocab_size, groups[("tp",)].uncounted())
        groups[("tp", "uncounted")] = vocab.group
    return Runner(
        key=request.model_key,
        model=stage.model,
        peers=StagePeers(layout.group_ranks("pp", state.rank), coords.pp, state.telemetry, comm=state.mpi),
        coords=coords,
        device=state.device,
        dtype=dtype,
        weight_bytes=stage.param_bytes(),
        load_seconds=time.perf_counter() - began,
        whole=whole,
        vocab=vocab,
        stage=stage,
        groups=[(tuple(d for d in dims if d != "uncounted"), g) for dims, g in groups.items()],
    )


class DeviceOutOfMemory(RuntimeError):
    """A device ran out of memory on this rank; the engine freed what it could and stays up."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed for want of memory.

    CUDA raises ``torch.OutOfMemoryError``. A CPU engine gets a plain ``RuntimeError`` from
    torch's allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N
    bytes. Error code 12 (Cannot allocate memory)") or from mapping a checkpoint ("unable to
    mmap N bytes ... Cannot allocate memory (12)"), a ``MemoryError`` from Python, or an
    ``OSError`` with ENOMEM."""
    import errno

    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and bool(_CPU_OOM.search(str(exc)))


_CPU_OOM = re.compile(r"can't allocate memory|not enough memory|Cannot allocate memory")
_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)|(?:allocate|mmap) (\d+) bytes")


def _asked(exc: BaseException) -> str:
    """What failed: the bytes the allocation asked for, as the error says them, else the
    error itself (mapping a checkpoint says ``MemoryError: Cannot allocate memory (os error 12)``)."""
    from ..units import format_bytes

    found = _ASKED.search(str(exc))
    if found is None:
        said = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    return f"asked for {found.group(1) or format_bytes(int(found.group(2)))}"


@contextlib.contextmanager
def out_of_memory_reported(state) -> Iterator[None]:
    import torch

    try:
        yield
    except Exception as exc:
        if isinstance(exc, DeviceOutOfMemory) or not out_of_memory(exc):
            raise  # (said already by an inner report)
        what = _asked(exc)
        runner = state.cache.pop("runner", None)
        if runner is not None:
            runner.close()  # free this rank's model: the next run reloads it
        del exc  # its traceback holds the frames, and they hold the tensors
        raise DeviceOutOfMemory(
            f"out of memory on rank {state.rank} ({state.device}): {what}; {_memory_left(state.device)}"
        ) from None


def _memory_left(device) -> str:
    """What the device has left once this rank's model is freed: a GPU's free and total
    memory; a CPU engine's host memory, and the process's own limit where one is set
    (``RLIMIT_AS``: the address space it may map, whatever the host has free)."""
    import gc

    import torch

    from ..units import format_bytes

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free, total = device_memory(device)
    if device.type == "cuda":
        return f"{format_bytes(free, unit='GiB')} free of {format_bytes(total, unit='GiB')}"
    import resource

    words = f"{format_bytes(free, unit='GiB')} of the host's {format_bytes(total, unit='GiB')} available"
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        words += f"; this engine may map {format_bytes(limit)} at most (its RLIMIT_AS)"
    return words


def prepare(state, request: Request) -> dict:
    """Load this rank's part of the model for ``request``'s layout, unless already loaded."""
    runner = state.cache.get("runner")
    if runner is not None and runner.key == request.model_key:
        if runner.stale:
            runner.rebind(state)
        state.telemetry.replica = runner.coords.dp  # (a `%%mp run` cell since made each rank its own)
        return {"weight_bytes": runner.weight_bytes, "load_seconds": 0.0, "import_seconds": 0.0, "reused": True}
    if runner is not None:
        state.cache.pop("runner").close()  # free the old layout's memory before loading
    # The first load on an engine imports transformers and the family's code, for seconds: a
    # phase of its own, so that the dashboard says so and "loading" is the loading alone.
    began = time.perf_counter()
    with state.telemetry.phase_scope("importing"):
        # An interrupt waits until they are in (mpbook.interrupts); the loading does not.
        from .. import models
        from ..interrupts import interrupt_held

        with interrupt_held():
            models.causal_lm_class(models.load_config(request.model))
    imported = time.perf_counter() - began
    with state.telemetry.phase_scope("loading"):
        runner = state.cache["runner"] = _build_runner(state, request)
    # The ranks of one replica (its stages and shards) work on the same tokens: the
    # dashboard counts each replica's tokens once.
    state.telemetry.replica = runner.coords.dp
    state.telemetry.note_memory("weights", runner.weight_bytes)
    return {"weight_bytes": runner.weight_bytes, "load_seconds": runner.load_seconds, "import_seconds": imported,
            "reused": False}


