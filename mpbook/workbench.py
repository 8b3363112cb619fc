"""The workbench: what a notebook holds, a cluster and the runs on it, behind one object.

    >>> with Workbench.start(n=2, cpu=True) as wb:
    ...     wb.run("print(rank, world_size)")
    [rank 0] 0 2
    [rank 1] 1 2

:class:`Workbench` composes the layers below it and adds what a person at a notebook wants on
top: dashboards that follow calls. Calls go one way: the workbench calls the session
(strategy runs), which calls the cluster (lifecycle and calling the engines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .cluster import Calls, Cluster
from .options import DEFAULT_TIMEOUT_S
from .protocol import DEFAULT_MODEL, EngineInfo
from .session import Session


class Workbench:
    """A cluster of engines, one per device, joined in one torch.distributed process group."""

    def __init__(self, cluster: Cluster):
        # Use Workbench.start() or Workbench.attach().
        self.cluster = cluster
        self.calls = Calls(cluster)
        self.session = Session(cluster, self.calls)
        self._standing: list = []  # dashboards (mpbook.dashboard.Dashboard) that follow every call

    # ----------------------------------------------------------------- construction
    @classmethod
    def start(cls, n: int | None = None, *, cpu: bool = False, gpu: bool = False,
              timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None, transport: str = "auto",
              hosts=None, ip: str | None = None, launcher: str = "ssh", python: str | None = None) -> Workbench:
        """Start a local cluster: one engine per visible GPU, or ``n`` CPU engines.

        ``threads``: intra-op threads per engine (default: the cores divided among engines).
        ``transport``: what CPU engines' collectives use: ``"mpi"`` (mpiexec-started engines,
        MPICH's shared memory), ``"gloo"``, or ``"auto"`` (MPI when installed).

        ``hosts``: engines on other hosts, e.g. ``"hosta:2,hostb:2"``, started by ipyparallel's
        ``launcher`` (``"ssh"``, ``"mpi"`` or ``"slurm"``) with ``python`` there (default:
        this Python's path); ``ip``: the address of this host the hosts reach (default: the
        route's). Ranks follow the hosts in the order given."""
        return cls(Cluster.start(n, cpu=cpu, gpu=gpu, timeout_s=timeout_s, threads=threads, transport=transport,
                                 hosts=hosts, ip=ip, launcher=launcher, python=python))

    @classmethod
    def attach(cls, **options: Any) -> Workbench:
        """Join a cluster that is already running (``ipcluster start``, MPI, SSH, Slurm ...);
        see :meth:`mpbook.cluster.Cluster.attach` for the options."""
        return cls(Cluster.attach(**options))

    # ----------------------------------------------------------------- the cluster
    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def ranks(self) -> list[int]:
        return self.cluster.ranks

    @property
    def device_type(self) -> str:
        return self.cluster.device_type

    @property
    def engines(self) -> list[EngineInfo]:
        return self.cluster.engines

    @property
    def client(self):
        """ipyparallel's Client of the cluster."""
        return self.cluster.client

    @property
    def owned(self) -> bool:
        return self.cluster.owned

    @property
    def stopped(self) -> bool:
        return self.cluster.stopped

    @property
    def timeout_s(self) -> float:
        return self.cluster.timeout_s

    @property
    def engine_spec(self):
        return self.cluster.spec

    def engine_ids(self, ranks: Sequence[int] | None = None) -> list[int]:
        return self.cluster.engine_ids(ranks)

    def pids(self) -> dict[str, list[int]]:
        return self.cluster.pids()

    def status(self) -> list[EngineInfo]:
        """Ask every engine afresh for its row of the engines table."""
        from .engine import state

        self.cluster.engines = self.calls.apply(state.describe, stream=False, what="asking for status")
        return self.cluster.engines

    def table(self) -> str:
        """The engines table (by host), and the links' summary once they were measured."""
        text = self.cluster.table()
        if self.cluster.links:
            from .bench_links import summary

            text += "\n" + summary(self.cluster.links)
        return text

    def measure_links(self):
        """Latency and bandwidth between every pair of ranks (a few seconds); kept for the
        status table's summary. Returns :class:`mpbook.bench_links.Link` rows."""
        from .bench_links import measure_links

        self.cluster.check_running("measuring the links")
        return measure_links(self)

    def interrupt(self, ranks: Sequence[int] | None = None) -> None:
        """Send SIGINT to the engines of ``ranks`` (all by default): a KeyboardInterrupt there."""
        self.cluster.interrupt(ranks)

    def restart(self) -> Workbench:
        """Bring the cluster back with the same layout (models reload on demand)."""
        self.cluster.restart()
        return self

    def stop(self) -> None:
        """Leave the process group; stop the controller and engines if mpbook started them."""
        self.cluster.stop()

    # ----------------------------------------------------------------- running work
    def run(self, code: str, ranks: str | Sequence[int] | None = None, *, stream: bool = True,
            on_tick: Callable[[], None] | None = None, dashboard: Any = None) -> None:
        """Execute ``code`` on every rank (or ``ranks``), with ``rank``, ``world_size``,
        ``device``, ``mesh``, ``telemetry``, ``torch`` and ``dist`` bound; stream output
        labelled by rank. ``dashboard``: True for a live dashboard of this call, or a
        :class:`mpbook.dashboard.Dashboard` to feed."""
        self.calls.run(code, ranks, stream=stream, follow=self._follower(dashboard, on_tick))

    def apply(self, fn: Callable[..., Any], *args: Any, ranks: str | Sequence[int] | None = None,
              stream: bool = True, on_tick: Callable[[], None] | None = None, what: str = "the call",
              dashboard: Any = None, **kwargs: Any) -> list[Any]:
        """Call ``fn(state, *args, **kwargs)`` on each rank; return the values in rank order.

        ``state`` is the engine's :class:`mpbook.engine.state.EngineState` (rank, device,
        mesh, and a cache that keeps models between calls).
        """
        return self.calls.apply(fn, *args, ranks=ranks, stream=stream, what=what,
                                follow=self._follower(dashboard, on_tick), **kwargs)

    def generate(self, prompts, *, strategy: str, model: str = DEFAULT_MODEL, on_tick: Callable[[], None] | None = None,
                 dashboard: Any = None, **options):
        """Generate with one strategy (``data``, ``pipeline`` or ``tensor``, degrees combinable
        with ``dp=``, ``pp=``, ``tp=``); see :meth:`mpbook.session.Session.generate` for the options."""
        self.cluster.check_running(f"running {strategy} parallel")
        follower = self._follower(dashboard, on_tick)
        try:
            return self.session.generate(prompts, strategy=strategy, model=model, follow=follower, **options)
        except BaseException as exc:
            if follower is not None:
                follower.abandon(exc)  # an error before dispatch: the dashboard says it
            raise

    def forward(self, prompts, *, strategy: str, model: str = DEFAULT_MODEL, **options):
        """One forward pass: the result's ``logits`` hold a (prompt_len, vocab) tensor per prompt."""
        return self.generate(prompts, strategy=strategy, model=model, max_new_tokens=0, **options)

    # ----------------------------------------------------------------- dashboards
    def follow_always(self, dashboard) -> None:
        """Let ``dashboard`` follow every call from now on (a standing dashboard)."""
        if dashboard not in self._standing:
            self._standing.append(dashboard)

    def unfollow(self, dashboard) -> None:
        if dashboard in self._standing:
            self._standing.remove(dashboard)

    def _follower(self, dashboard: Any, on_tick: Callable[[], None] | None):
        """What watches one call: its own dashboard (True: a new one), the standing ones, a tick.

        A :class:`mpbook.dashboard.Follower`: ``F(result, ranks)`` is the wait loop's context
        manager; a strategy run also calls ``F.describe_run(info)`` and ``F.show_result(result)``."""
        if not dashboard and not self._standing and on_tick is None:
            return None
        from .dashboard import Dashboard, follow

        dashboards = [Dashboard(self) if dashboard is True else dashboard] if dashboard else []
        dashboards += [d for d in self._standing if d not in dashboards]
        return follow(dashboards, on_tick=on_tick)

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{self.world_size} engines on {self.device_type}"
        return f"<Workbench {'started' if self.owned else 'attached'}, {state}>"
