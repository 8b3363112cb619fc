"""What mpbook needs from torch beyond its public API (checked against torch 2.13).

- ``torch.distributed._tools.mem_tracker.MemTracker``: tensor memory counted op by op, for
  comparing a rank's tensor peak with the planner on CPU engines (where the process peak
  includes the Python runtime); :class:`TensorPeak` overrides two of its private methods
  (``_track_module_params_and_buffers``, ``_pre_fw_hook``), and ``verify()`` checks both;
- ``torch.distributed.distributed_c10d._abort_process_group``: end the process groups of an
  interrupted rank at once, without waiting for work in flight (gloo and NCCL);
- ``torch._dynamo.utils.counters``: how many graphs ``torch.compile`` has made in this process
  (:func:`graphs_compiled`; the tests check that ``--compile`` compiles once per shape);
- ``torch._dynamo.config.recompile_limit`` and ``accumulated_recompile_limit``: how many graphs
  one compiled function may keep before dynamo runs it eagerly (:func:`allow_recompiles`;
  every loaded model's decode step is one function to dynamo);
- ``torch.ops.mkldnn._reorder_linear_weight`` and ``torch.ops.mkldnn._linear_pointwise``: a
  Linear weight packed in oneDNN's blocked layout and the product with it, the pair inductor's
  CPU weight prepacking uses (:func:`onednn_pack`, :func:`onednn_linear`;
  :mod:`mpbook.models.packed_linear`).
"""

from __future__ import annotations

CHECKED = "2.13"


class TensorPeak:
    """Peak bytes of live tensors while the block runs, the given ones included.

    A CPU engine's process peak includes the Python runtime and the allocator's slack, so it
    cannot be compared with what the planner predicts; this counts tensors alone: the given
    ``existing`` tensors and modules (their parameters and buffers) plus every tensor an op
    creates, until its storage is freed, as torch's MemTracker counts them. MemTracker sees
    every op, so it slows the run: use it to measure, not to serve.

    MemTracker is made for training, and two of its habits are changed here: it takes a root
    module's second call for a second iteration and refuses it (a generation calls the same
    modules once per step, so each such call starts a fresh set of per-module statistics; the
    peak spans the whole block), and it hooks every parameter's gradient, which fails for
    parameters that do not require one (the engines' weights).

    >>> with TensorPeak(model, inputs) as peak: model(inputs)   # doctest: +SKIP
    >>> peak.bytes                                              # doctest: +SKIP
    """

    def __init__(self, *existing):
        from torch.distributed._tools.mem_tracker import MemTracker

        class _Tracker(MemTracker):
            def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
                # Nothing here runs backward, and a gradient hook cannot be registered on a
                # parameter that does not require one (every loaded or sharded weight here).
                return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def _pre_fw_hook(self, module, inputs):
                try:
                    super()._pre_fw_hook(module, inputs)
                except NotImplementedError:  # the module's next call: the next decode step
                    self.reset_mod_stats()
                    super()._pre_fw_hook(module, inputs)

        self._tracker = _Tracker()
        self._tracker.track_external(*existing)

    @property
    def bytes(self) -> int:
        """The peak so far, over every device the tensors were on."""
        peak = self._tracker.get_tracker_snapshot("peak")
        return int(sum(per_device["Total"] for per_device in peak.values()))

    def __enter__(self) -> TensorPeak:
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._tracker.__exit__(*exc)


def strided_shard(dim: int, *, split_factor: int):
    """DTensor's placement for a fused weight packed along ``dim`` (gate|up): each rank's shard
    is its slice of every one of the ``split_factor`` parts (``_StridedShard``, private), the
    placement transformers' ``packed_colwise`` style uses; the tests compare mpbook's shards with it."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


def abort_process_groups() -> None:
    """Drop every process group of this process now, not waiting for work in flight.

    Aborted (``_abort_process_group``), not destroyed, on every backend: destroying an NCCL
    communicator with a kernel in flight can block, and a destroyed gloo group keeps its
    connections open while work handles of the run still refer to it. Destroyed where this
    torch cannot abort.
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


def graphs_compiled() -> int:
    """How many graphs ``torch.compile`` has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def allow_recompiles(limit: int) -> None:
    """Let one compiled function keep at least ``limit`` graphs before dynamo gives up on it
    (and runs it eagerly, with only a warning)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, limit)


def onednn_pack(weight, rows: int):
    """``weight`` (out, in) packed for oneDNN's matrix product with ``rows`` rows of input: an
    opaque tensor of the same bytes (``to_dense()`` gives the weight back, bit for bit)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(x, packed, bias):
    """``F.linear(x, weight, bias)`` with the weight packed by :func:`onednn_pack`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_available() -> bool:
    """Whether this torch has oneDNN on the CPU (x86 and Arm wheels do)."""
    import torch

    return torch.backends.mkldnn.is_available()


def verify() -> None:
    """Raise with a clear message if this torch lacks what the adapter uses.

    Runs TensorPeak on a small module without gradients, called twice under
    ``inference_mode`` (as a decode loop calls it): the peak must be the weights, the input
    and the largest step's outputs.
    """
    import inspect

    import torch

    problems = []
    try:
        from torch.distributed._tools.mem_tracker import MemTracker

        # TensorPeak overrides these two: a rename would leave its override unused, not failing.
        for method, parameter in (("_track_module_params_and_buffers", "install_grad_hooks"),
                                  ("_pre_fw_hook", "inputs")):
            if parameter not in inspect.signature(getattr(MemTracker, method)).parameters:
                problems.append(f"MemTracker.{method} no longer takes {parameter}")
    except (ImportError, AttributeError) as exc:
        problems.append(f"MemTracker's overridden methods: {exc}")
    try:
        layer = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)  # 16 KiB of weights, as loaded
        x = torch.ones(8, 64)  # 2 KiB
        with torch.inference_mode(), TensorPeak(layer, x) as peak:
            y = layer(x)  # + 2 KiB
            y = layer(y)  # the first output is freed only after the second exists: + 2 KiB
        if peak.bytes != (64 * 64 + 3 * 8 * 64) * 4:
            problems.append(f"MemTracker counted {peak.bytes} bytes for a peak of {(64 * 64 + 3 * 8 * 64) * 4}")
    except ImportError as exc:
        problems.append(f"{exc.name or exc} is gone (MemTracker)")
    except Exception as exc:  # a changed hook or snapshot format
        problems.append(f"MemTracker under inference_mode: {type(exc).__name__}: {exc}")
    try:
        strided_shard(0, split_factor=2)
    except (ImportError, TypeError) as exc:
        problems.append(f"_StridedShard(dim, split_factor=) changed: {exc}")
    from torch.distributed import distributed_c10d

    if not callable(getattr(distributed_c10d, "_abort_process_group", None)):
        problems.append("distributed_c10d._abort_process_group is gone")
    try:
        before = graphs_compiled()
        torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))  # dynamo alone: no code generated
        if graphs_compiled() != before + 1:
            problems.append("torch._dynamo.utils.counters no longer counts compiled graphs as unique_graphs")
    except (ImportError, KeyError) as exc:
        problems.append(f"torch._dynamo.utils.counters: {exc}")
    try:
        allow_recompiles(0)  # never lowers a limit: reads and writes both settings as they are
    except (ImportError, AttributeError) as exc:
        problems.append(f"torch._dynamo.config's recompile limits: {exc}")
    if onednn_available():
        try:
            weight, x = torch.randn(24, 16), torch.randn(3, 16)
            packed = onednn_pack(weight, 3)
            if not torch.equal(packed.to_dense(), weight):
                problems.append("a oneDNN-packed weight's to_dense() is not the weight")
            torch.testing.assert_close(onednn_linear(x, packed, None), x @ weight.t())
        except (AttributeError, RuntimeError, AssertionError) as exc:
            problems.append(f"mkldnn._reorder_linear_weight / _linear_pointwise: {type(exc).__name__}: {exc}")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.torch was checked against torch {CHECKED}; torch {torch.__version__} differs: "
            f"{'; '.join(problems)}"
        )
