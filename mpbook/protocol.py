"""What the notebook and the engines exchange: plain data that both sides import.

Everything here is a frozen dataclass or a constant, cheap to import (no torch), and
pickled by ipyparallel as it is. The client builds a :class:`Request`, every engine answers
with a :class:`RankOutput`; engines publish telemetry snapshots under :data:`TELEMETRY_START`
and :data:`TELEMETRY_LATEST`, each a dict whose keys are listed in :data:`SNAPSHOT_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .layout import Coords, Layout

# ----------------------------------------------------------------------------- precision
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
# Names a person may type for a dtype -> torch's name for it.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# The defaults of a generation wherever one is asked for (Session.generate, the %%mp options,
# mpbook.plan, the request the engines get); how tokens are chosen by default is Sampling's.
DEFAULT_MODEL = "tiny"
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_DTYPE = "float32"

# ----------------------------------------------------------------------------- telemetry
# importing: transformers and the model's code, before the first load of a model on an engine
PHASES = ("idle", "importing", "loading", "compiling", "prefill", "decode")
# What a rank's memory holds, where a strategy knows it (Telemetry.note_memory).
MEMORY_PARTS = ("weights", "kv_cache", "activations")
# Keys of the engines' DataPub messages: the snapshot taken as a task began (the baseline
# of the task's own figures) and the latest one. The client's merge replaces a key whole.
TELEMETRY_START, TELEMETRY_LATEST = "telemetry_start", "telemetry"
SNAPSHOT_KEYS = (
    "rank", "host", "device", "phase", "time", "tokens", "phase_seconds", "collectives",
    "collective_seconds", "collective_seconds_by_kind", "memory", "memory_parts", "replica",
    "expert_tokens", "stream",
)


@dataclass(frozen=True)
class Event:
    """One stage working on one micro-batch: a bar of the pipeline timeline."""

    rank: int
    stage: int
    microbatch: int
    phase: str
    start: float  # seconds since the run began on this rank
    end: float
    # time.time() when this rank's run began: ranks start their runs at slightly different
    # moments, so bars of different ranks line up only on run_began + start.
    run_began: float = 0.0


# ----------------------------------------------------------------------------- the cluster
@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet to form a process group.

    ``file``: a FileStore in a private folder, for ranks on one host; nothing listens on
    the network. ``tcp``: a TCPStore served by rank 0 at ``host:port``, for ranks on
    several hosts.
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class EngineInfo:
    """One row of the engines table."""

    rank: int
    engine_id: int
    host: str
    pid: int
    device: str
    device_name: str
    backend: str
    memory_free_bytes: int
    memory_total_bytes: int
    threads: int
    model_bytes: int = 0  # weights of the model loaded on this engine (freed when another loads)
    transport: str = ""  # what mpbook's collectives travel over: "mpi", or the backend ("gloo", "nccl")
    cores: int = 0  # the cores this engine's process may run on (its host's, as its affinity says; 0: not known)


# ----------------------------------------------------------------------------- a run
@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (transformers' semantics); greedy by default.

    ``seed``: the random stream of prompt i is seeded from (seed, i), so a seed gives the
    same tokens on every layout and any batch split.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None
    do_sample: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class Stopping:
    """When a row is finished: end-of-sequence, a stop string, or the cap."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Request:
    """What every rank needs to know about one run; sent whole to every engine.

    The prompts arrive tokenized (the client holds the tokenizer); ``input_ids[i]`` is prompt
    i's ids, unpadded.
    """

    model: str
    layout: Layout
    input_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int  # 0: a forward pass only, returning logits
    pad_token_id: int
    microbatches: int = 1
    dtype: str = DEFAULT_DTYPE
    stage_sizes: tuple[int, ...] | None = None
    attention: str | None = None  # None: the implementation transformers picks for the model
    # Parallel plans given by the user for a family whose config has none, in transformers'
    # format: {"tp": {pattern: style}, "pp": {module: (inputs, outputs)}, "ep": {...}}.
    plans: dict | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stopping: Stopping = field(default_factory=Stopping)
    # Track every tensor's bytes through the run (torch's MemTracker): the peak of weights,
    # KV cache and activations alone, comparable with the planner on CPU engines too, where
    # the process peak includes the Python runtime. Slows the run; off by default.
    track_tensors: bool = False
    # Stream each prompt's new tokens in the telemetry snapshots (for live text).
    stream: bool = True
    # A static KV cache and a torch.compile'd decode step (mpbook.engine.compiled).
    compile: bool = False
    # CPU engines: keep every weight a plain dense tensor, never packed for oneDNN
    # (mpbook.models.packed_linear), for a family whose code reads a Linear's weight itself.
    dense_weights: bool = False

    @property
    def model_key(self) -> tuple:
        """Runs with the same key reuse the loaded model."""
        plans = repr(sorted((self.plans or {}).items()))
        return (self.model, self.layout, self.stage_sizes, self.dtype, self.attention, plans)


@dataclass
class RankOutput:
    """One rank's report of a run; the client merges these into the result."""

    rank: int
    coords: Coords
    stage: int
    rows: range  # indices of the prompts this rank's replica served
    reports_tokens: bool  # the rank that chooses its replica's tokens speaks for it
    tokens: list[list[int]] | None
    logits: list[Any] | None  # forward pass: one (prompt_len, vocab) tensor per prompt
    prompt_tokens: int
    new_tokens: int
    started: float
    phase_seconds: dict[str, float]
    collectives: dict[str, int]
    collective_seconds: float
    events: list[Event]
    peak_memory_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    load_seconds: float = 0.0  # 0 when the model was loaded already
    import_seconds: float = 0.0  # importing transformers and the model's code before loading (0 when loaded)
    engine_seconds: float = 0.0  # the whole run on this engine, loading included
    memory_free_bytes: int = 0  # the device's free memory after the run (CPU: the host's available)
    tensor_peak_bytes: int | None = None
    token_times: list[list[float]] | None = None  # per row: seconds since the run began, one per new token
    expert_tokens: int = 0  # tokens routed to this rank's experts (expert parallel)
    stop_reasons: list[str] | None = None  # per row: "eos", "stop", "length"
    # What each of this rank's groups moved its tensors over, by dims: {"tp": "mpi", "pp": "gloo"}.
    transports: dict[str, str] = field(default_factory=dict)
    # Where this rank's decode steps went, in seconds (mpbook.engine.steps.StepBreakdown).
    step_breakdown: dict[str, float] = field(default_factory=dict)
    # --compile: the seconds this run spent compiling the decode step before its prefill;
    # None when it compiled nothing (no --compile, or every shape compiled in an earlier cell).
    compile_seconds: float | None = None
    host: str = ""  # the engine's host name (figures group their ranks by host)
