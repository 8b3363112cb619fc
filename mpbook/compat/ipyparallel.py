"""What mpbook needs from ipyparallel beyond its public API (checked against 9.2).

- the futures of an AsyncResult's targets (``AsyncResult._children``), to wait for some
  targets only (the survivors after an engine died);
- a hook into an engine's stop on SIGTERM (``IPEngine._signal_stop``), to exit cleanly.

Per-target output and published data come from the public ``AsyncResult.metadata``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

CHECKED = "9.2"


def target_metadata(result) -> list[dict[str, Any]]:
    """One metadata dict per target of ``result`` (stdout, stderr, data ...), never blocking."""
    metadata = result.metadata  # public; a single dict for a single-target result
    return [metadata] if isinstance(metadata, dict) else list(metadata)


def wait_for_targets(result, positions: Sequence[int], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the targets at ``positions`` of ``result``; True if done."""
    children = getattr(result, "_children", None)
    if not children or len(children) <= max(positions, default=-1):
        return result.wait(timeout_s)
    done, pending = concurrent.futures.wait([children[i] for i in positions], timeout=timeout_s)
    return not pending


def engine_class():
    """ipyparallel's engine application, recording whether a stop was asked for (SIGTERM)."""
    from ipyparallel.engine.app import IPEngine

    class Engine(IPEngine):
        stopping = False

        def _signal_stop(self, sig, frame):
            Engine.stopping = True
            super()._signal_stop(sig, frame)

    return Engine


def verify() -> None:
    """Raise with a clear message if this ipyparallel lacks what the adapter uses."""
    import ipyparallel
    from ipyparallel.client.asyncresult import AsyncResult
    from ipyparallel.engine.app import IPEngine

    problems = []
    if not callable(getattr(IPEngine, "_signal_stop", None)):
        problems.append("IPEngine._signal_stop (the engine's SIGTERM handler) is gone")
    if "metadata" not in dir(AsyncResult):
        problems.append("AsyncResult.metadata is gone")
    init = AsyncResult.__init__.__code__
    if "_children" not in init.co_names:
        problems.append("AsyncResult no longer keeps its targets' futures in _children")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.ipyparallel was checked against ipyparallel {CHECKED}; "
            f"ipyparallel {ipyparallel.__version__} differs: {'; '.join(problems)}"
        )
