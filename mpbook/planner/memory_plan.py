"""The result of :func:`mpbook.plan`: per-rank bytes of one layout, whether it fits, other layouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from ..layout import Layout
from . import rendering
from .placement import Device, devices_for, engine_count
from .ranks import PlannedModel, RankMemory
from .speed import SpeedPrediction
from .suggestions import Suggestion, suggest
from .workload import Workload


@dataclass
class MemoryPlan:
    """Predicted per-rank memory of one layout, whether it fits, and other layouts that would.

    Each rank's ``total`` is its predicted peak: weights + KV cache (at the full length:
    the prompt and every new token but the last) + activations (the largest forward of one
    micro-batch). Weights and KV cache are exact for the module tree and DynamicCache;
    activations are an estimate.
    """

    model: str
    architecture: str
    layout: Layout
    workload: Workload
    ranks: list[RankMemory]
    memory_source: str
    suggestions: list[Suggestion]
    speed: SpeedPrediction | None = None  # with a calibration: predicted tokens/s, per rank by part
    _model: PlannedModel = field(default=None, repr=False, compare=False)
    _devices: list[Device] = field(default_factory=list, repr=False, compare=False)

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    @property
    def peak_bytes(self) -> int:
        """The largest per-rank total."""
        return max(r.total for r in self.ranks)

    @property
    def devices(self) -> list[Device]:
        """Where each rank runs and the memory it may take: give them to another plan of the same
        engines (``plan(..., devices=p.devices)``) and it asks nobody again."""
        return list(self._devices)

    def rank(self, rank: int) -> RankMemory:
        return self.ranks[rank]

    def suggest(self, engines=None, *, device_memory_bytes=None) -> list[Suggestion]:
        """Layouts over ``engines`` (default: this plan's ranks) valid for the model, fitting ones first."""
        world = engine_count(engines) or self.layout.world_size
        if engines is None and device_memory_bytes is None and world == self.layout.world_size:
            devices = self._devices
        else:
            devices, _ = devices_for(engines, device_memory_bytes, world)
        return suggest(self._model, self.workload, world, devices)

    def arithmetic(self) -> list[str]:
        """How the numbers are made, once for each group of ranks that hold the same."""
        return rendering.arithmetic(self)

    def __str__(self) -> str:
        return rendering.text(self)

    def _repr_html_(self) -> str:
        return rendering.html_view(self)
