"""What mpbook needs from torch beyond its public API (checked against torch 2.13).

- ``torch.utils._python_dispatch.TorchDispatchMode`` and ``torch.utils._pytree.tree_leaves``:
  tensor memory counted op by op, for comparing a rank's tensor peak with the planner on CPU
  engines (where the process peak includes the Python runtime);
- ``torch.distributed.distributed_c10d._abort_process_group``: end NCCL communicators that
  may have work in flight without waiting for it (an interrupted rank).
"""

from __future__ import annotations

CHECKED = "2.13"


class TensorPeak:
    """Peak bytes of live tensors while the block runs, what existed before included.

    A CPU engine's process peak includes the Python runtime and the allocator's slack, so it
    cannot be compared with what the planner predicts; this counts tensors alone: the given
    ``existing`` tensors (or every parameter and buffer of given modules) plus every tensor
    an op creates, until its storage is freed. Storages are keyed by their address, so views
    and in-place results count once. A TorchDispatchMode sees every op, so it slows the run:
    use it to measure, not to serve.

    torch's own MemTracker would be the library for this, but it registers gradient hooks on
    module outputs and fails under ``inference_mode`` ("cannot register a hook on a tensor
    that doesn't require gradient", torch 2.13), which is how every run here executes.

    >>> with TensorPeak(model, inputs) as peak: model(inputs)   # doctest: +SKIP
    >>> peak.bytes                                              # doctest: +SKIP
    """

    def __init__(self, *existing):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.current = 0
        self.bytes = 0
        self._live: dict[int, int] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    tracker.track(leaf)
                return out

        self._mode = _Mode()
        self._finalize = weakref.finalize
        self.track(*existing)

    def track(self, *objects) -> None:
        """Count tensors (or every parameter and buffer of modules) from now on."""
        import torch

        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                self.track(*obj.parameters(), *obj.buffers())
                continue
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.bytes = max(self.bytes, self.current)
            self._finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __enter__(self) -> TensorPeak:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def abort_process_groups() -> None:
    """Drop every process group of this process now, not waiting for work in flight.

    gloo: destroying the group closes its connections, so a peer blocked in a collective
    with this rank gets "connection closed" at once. NCCL: communicators are aborted first,
    since destroying one with a kernel in flight can block.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        abort()
        return
    dist.destroy_process_group()


def verify() -> None:
    import torch

    problems = []
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves  # noqa: F401

        if "__torch_dispatch__" not in dir(TorchDispatchMode):
            problems.append("TorchDispatchMode no longer dispatches through __torch_dispatch__")
    except ImportError as exc:
        problems.append(f"{exc.name or exc} is gone")
    from torch.distributed import distributed_c10d

    if not callable(getattr(distributed_c10d, "_abort_process_group", None)):
        problems.append("distributed_c10d._abort_process_group is gone")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.torch was checked against torch {CHECKED}; torch {torch.__version__} differs: "
            f"{'; '.join(problems)}"
        )
