"""The workbench: an ipyparallel cluster with one torch.distributed process group over it.

    >>> with Workbench.start(n=2, cpu=True) as wb:
    ...     wb.run("print(rank, world_size)")
    [rank 0] 0 2
    [rank 1] 1 2

Rank r is the engine at position r of the sorted engine ids. A cluster that mpbook starts
lives on this host, listens on loopback only and is stopped by ``stop()``, by leaving the
``with`` block, or at interpreter exit (a notebook kernel's shutdown included). A cluster
that mpbook attaches to (``Workbench.attach``) is left running: mpbook only leaves the
process group it formed there.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import engine, remote
from ._launch import OWNER_ENV
from .engine import EngineInfo, Rendezvous
from .errors import CollectiveError, EngineDiedError, MpbookError, NoClusterError, RankError
from .health import EngineWatch, is_collective_failure, process_running, signal_engines

DEFAULT_CPU_ENGINES = 2
DEFAULT_TIMEOUT_S = 60.0
# A collective that only some ranks enter waits this long before gloo/NCCL give up; longer
# would leave a notebook user staring at a cell that can never finish.
MAX_TIMEOUT_S = 60.0
ENGINE_TIMEOUT_S = 60.0  # for engines to register after they are launched
# ipyparallel's default heartbeat (3 s) makes engine registration take ~6.5 s for two
# engines here; 250 ms brings it to ~2 s and still notices a dead engine within seconds.
HEARTBEAT_MS = 250


def visible_gpu_count() -> int:
    """GPUs this process may use, asked of NVML so that no CUDA context is created here."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        count = min(count, len(listed))
    return count


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_ranks(spec: str | int | Iterable[int] | None, world_size: int) -> list[int]:
    """``None``/"all" -> every rank; "0,2" or "1-3" or [0, 2] -> those ranks, checked."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(world_size))
    have = f"the cluster has ranks 0-{world_size - 1} ({world_size} engines)"
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, str):
        ranks = []
        for part in spec.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                raise MpbookError(
                    f"--ranks {spec!r}: write ranks as numbers, ranges or 'all', e.g. 0,2 or 0-{world_size - 1}"
                ) from None
            if first > last:
                raise MpbookError(f"--ranks {spec!r}: {part} is an empty range; write ranges low-high, e.g. 0-{world_size - 1}")
            # Checked before expanding: a typo such as 0-99999999999 must not build a huge list.
            if first < 0 or last >= world_size:
                lo, hi = (max(first, world_size), last) if last >= world_size else (first, min(last, -1))
                which = f"rank {lo} does" if lo == hi else f"ranks {lo}-{hi} do"
                raise MpbookError(f"--ranks {spec!r}: {have}; {which} not exist")
            ranks.extend(range(first, last + 1))
    else:
        ranks = [int(r) for r in spec]
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad or not ranks:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise MpbookError(
            f"--ranks {spec!r}: {have}; {'rank ' + shown + ' does not exist' if bad else 'no rank chosen'}"
        )
    return sorted(set(ranks))


@dataclass(frozen=True)
class StartPlan:
    """How many engines, on what, with how many threads each: decided before anything starts."""

    n: int
    use_gpu: bool
    threads: int

    @classmethod
    def choose(cls, n: int | None = None, *, cpu: bool = False, gpu: bool = False, gpus: int | None = None) -> StartPlan:
        """``gpus``: how many GPUs are visible (asked of NVML when not given)."""
        if cpu and gpu:
            raise MpbookError("--cpu and --gpu contradict each other: choose one")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise MpbookError(f"-n {n}: a cluster needs at least one engine; use -n 1 or more")
        if cpu:
            gpus = 0
        elif gpus is None:
            gpus = visible_gpu_count()
        if gpu and gpus == 0:
            raise MpbookError("--gpu: no CUDA GPU is visible here; leave out --gpu to start CPU engines")
        if gpus:
            n = gpus if n is None else n
            if n > gpus:
                raise MpbookError(
                    f"-n {n}: one engine per GPU and {gpus} GPU{'s are' if gpus > 1 else ' is'} visible; "
                    f"use -n {gpus} or fewer, or --cpu for {n} CPU engines"
                )
            return cls(n=n, use_gpu=True, threads=max(1, usable_cores() // n))
        n = DEFAULT_CPU_ENGINES if n is None else n
        most = max(8, 4 * usable_cores())
        if n > most:
            raise MpbookError(
                f"-n {n}: {usable_cores()} cores cannot run that many CPU engines (each a process holding its "
                f"own part of the model); use -n {most} or fewer"
            )
        # Engines inherit the kernel's environment; without a share each would start one
        # thread per core and together they would oversubscribe the CPU.
        return cls(n=n, use_gpu=False, threads=max(1, usable_cores() // n))


def check_timeout(timeout_s: float) -> float:
    """The collective timeout, checked: more than 0 and at most MAX_TIMEOUT_S seconds."""
    try:
        value = float(timeout_s)
    except (TypeError, ValueError):
        raise MpbookError(f"--timeout {timeout_s!r}: give the seconds a collective may wait as a number, e.g. 30") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # also false for nan
        raise MpbookError(
            f"--timeout {timeout_s!r}: a collective may wait more than 0 and at most {MAX_TIMEOUT_S:g} s; "
            f"choose e.g. --timeout {DEFAULT_TIMEOUT_S:g}"
        )
    return value


def format_engines(infos: Sequence[EngineInfo]) -> str:
    """The engines table, as text."""
    gib = 1024**3
    rows = [("rank", "host", "pid", "device", "backend", "threads", "free / total memory")]
    for i in infos:
        device = i.device if i.device_name == "cpu" else f"{i.device} ({i.device_name})"
        memory = f"{i.memory_free_bytes / gib:.1f} / {i.memory_total_bytes / gib:.1f} GiB"
        rows.append((str(i.rank), i.host, str(i.pid), device, i.backend, str(i.threads), memory))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


class Workbench:
    """A cluster of engines, one per device, joined in one torch.distributed process group."""

    def __init__(self, *, owned: bool, plan: StartPlan, timeout_s: float, rendezvous: str, client=None):
        # Use Workbench.start() or Workbench.attach().
        self.owned = owned
        self.plan = plan
        self.timeout_s = check_timeout(timeout_s)
        self.rendezvous_kind = rendezvous
        self.client = client
        self.cluster = None
        self.engines: list[EngineInfo] = []
        self._engine_ids: list[int] = []
        self._hosts: list[str] | None = None  # by rank, for an attached cluster
        self._generation = 0
        self._stopped = False
        self.dashboards: list = []  # standing dashboards (mpbook.dashboard.stand) that follow every call
        self._started_procs: list = []  # psutil.Process of everything launched, for the last reap
        self._arm_exit_hook()

    def _arm_exit_hook(self) -> None:
        # A partial per workbench, so that unregistering one leaves the others armed.
        self._cleanup = functools.partial(_stop_at_exit, weakref.ref(self))
        atexit.register(self._cleanup)

    # ----------------------------------------------------------------- construction
    @classmethod
    def start(
        cls,
        n: int | None = None,
        *,
        cpu: bool = False,
        gpu: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        threads: int | None = None,
    ) -> Workbench:
        """Start a local cluster: one engine per visible GPU, or ``n`` CPU engines (gloo).

        ``threads``: intra-op threads per engine (default: the cores divided among engines)."""
        check_timeout(timeout_s)
        plan = StartPlan.choose(n, cpu=cpu, gpu=gpu)
        if threads is not None:
            if threads < 1:
                raise MpbookError(f"threads={threads}: each engine needs at least one thread")
            plan = dataclasses.replace(plan, threads=threads)
        wb = cls(owned=True, plan=plan, timeout_s=timeout_s, rendezvous="file")
        wb._launch()
        return wb

    def _launch(self) -> None:
        """Start the controller and engines of an owned cluster and form the process group."""
        import ipyparallel as ipp
        from traitlets.config import Config

        plan = self.plan
        config = Config()
        launch = [sys.executable, "-m", "mpbook._launch"]
        config.LocalControllerLauncher.controller_cmd = [*launch, "controller"]
        config.LocalControllerLauncher.environment = {OWNER_ENV: str(os.getpid())}
        config.LocalEngineLauncher.engine_cmd = [*launch, "engine"]
        threads = str(plan.threads)
        config.LocalEngineSetLauncher.environment = {
            OWNER_ENV: str(os.getpid()),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.cluster = cluster = ipp.Cluster(
            n=plan.n,
            config=config,
            controller_ip="127.0.0.1",  # the controller listens on loopback only
            # Schedulers in threads rather than 8 forked processes: a faster start, and
            # fewer processes to compete for the cores with the engines.
            controller_args=[f"--HeartMonitor.period={HEARTBEAT_MS}", "--IPController.use_threads=True"],
            # Engines find the controller's connection file themselves, so they start
            # (and import torch) while the controller is still coming up.
            send_engines_connection_env=False,
            delay=0,
            log_level=logging.WARNING,
        )
        try:
            cluster.start_cluster_sync()
            # ipyparallel has just registered its own exit hook, which stops the processes
            # without leaving the process group (the rendezvous folder would stay behind).
            # atexit runs hooks last-in first-out: register ours again so that it runs first.
            atexit.unregister(self._cleanup)
            atexit.register(self._cleanup)
            self.client = cluster.connect_client_sync()
            # interactive=False: no progress bar in the notebook for a two-second wait.
            self.client.wait_for_engines(plan.n, timeout=ENGINE_TIMEOUT_S, interactive=False)
            self._form_group(hosts=None)
            # Children (the controller's heart monitor, the nannies) can no longer be found
            # from a parent that was killed; remember them now to reap them at stop.
            self._started_procs = _process_trees(self.pids())
        except BaseException as exc:
            self.stop()
            if isinstance(exc, (KeyboardInterrupt, MpbookError)):
                raise
            raise MpbookError(
                f"the cluster did not come up ({type(exc).__name__}: {exc}); its logs are in {cluster.profile_dir}/log"
            ) from exc

    @classmethod
    def attach(
        cls,
        *,
        profile: str | None = None,
        cluster_id: str | None = None,
        cpu: bool = False,
        n: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_s: float = 30.0,
        rendezvous: str | None = None,
    ) -> Workbench:
        """Join a cluster that is already running (``ipcluster start``, MPI, SSH, Slurm ...).

        Waits up to ``wait_s`` for ``n`` engines (default: those registered, at least one).
        The process group's rendezvous is a file when every engine is on one host, else a
        TCP store served by rank 0 at its own address.
        """
        import ipyparallel as ipp
        from IPython.paths import get_ipython_dir

        if n is not None and n < 1:
            raise MpbookError(f"-n {n}: wait for at least one engine; use -n 1 or more")
        check_timeout(timeout_s)
        if profile is not None:
            from IPython.core.profiledir import ProfileDir, ProfileDirError

            try:
                ProfileDir.find_profile_dir_by_name(get_ipython_dir(), profile)
            except ProfileDirError:
                raise MpbookError(
                    f"--profile {profile}: no IPython profile of that name in {get_ipython_dir()}; "
                    f"start its cluster with `ipcluster start --profile {profile}`, or leave out --profile"
                ) from None
        where = f"profile {profile or 'default'}" + (f", cluster id {cluster_id}" if cluster_id else "")
        try:
            client = ipp.Client(profile=profile or "default", cluster_id=cluster_id or "", timeout=10)
        except Exception as exc:
            raise MpbookError(
                f"no running cluster found for {where} ({exc}); start one with "
                f"`ipcluster start{' --profile ' + profile if profile else ''}"
                f"{' --cluster-id ' + cluster_id if cluster_id else ''}`, or use `%mp start`"
            ) from None
        try:
            client.wait_for_engines(n or 1, timeout=wait_s, interactive=False)
        except Exception:
            have = len(client.ids)
            client.close()
            raise MpbookError(
                f"the cluster at {where} has {have} engine{'s' if have != 1 else ''} after {wait_s:.0f} s, "
                f"{n or 1} wanted; start more engines or ask for fewer with -n"
            ) from None
        ids = sorted(client.ids)[: n or None]
        hosts = client[ids].apply_sync(engine.hostname)
        kind = rendezvous or ("file" if len(set(hosts)) == 1 else "tcp")
        plan = StartPlan(n=len(ids), use_gpu=False, threads=0)
        wb = cls(owned=False, plan=plan, timeout_s=timeout_s, rendezvous=kind, client=client)
        wb._engine_ids = ids
        if not cpu:
            wb.plan = StartPlan(n=len(ids), use_gpu=wb._engines_have_gpus(ids, hosts), threads=0)
        try:
            wb._form_group(hosts=hosts)
        except BaseException:
            wb.stop()
            raise
        return wb

    def _engines_have_gpus(self, ids: list[int], hosts: list[str]) -> bool:
        counts = self.client[ids].apply_sync(visible_gpu_count)
        per_host: dict[str, int] = {}
        for host in hosts:
            per_host[host] = per_host.get(host, 0) + 1
        return all(count >= per_host[host] for count, host in zip(counts, hosts))

    def _form_group(self, hosts: list[str] | None) -> None:
        """Rank the engines, make the rendezvous on rank 0, and init the process group on all."""
        if not self._engine_ids:
            self._engine_ids = sorted(self.client.ids)[: self.plan.n]
        ids = self._engine_ids
        hosts = hosts or [""] * len(ids)
        self._hosts = hosts
        self._generation += 1
        rdzv: Rendezvous = self.client[ids[0]].apply_sync(engine.make_rendezvous, self.rendezvous_kind, self._generation)
        table = {}
        for rank, (eid, host) in enumerate(zip(ids, hosts)):
            table[eid] = dict(
                rank=rank,
                world_size=len(ids),
                local_rank=hosts[:rank].count(host),
                engine_id=eid,
                use_gpu=self.plan.use_gpu,
                threads=self.plan.threads or None,
                rendezvous=rdzv,
                timeout_s=self.timeout_s,
            )
        result = self.client[ids].apply_async(engine.setup_from_table, table)
        self.engines = remote.wait(result, self.ranks, stream=False, what="forming the process group")

    # ----------------------------------------------------------------- properties
    @property
    def world_size(self) -> int:
        return len(self._engine_ids)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    @property
    def device_type(self) -> str:
        return "cuda" if self.plan.use_gpu else "cpu"

    def engine_ids(self, ranks: Sequence[int] | None = None) -> list[int]:
        return [self._engine_ids[r] for r in (self.ranks if ranks is None else ranks)]

    def pids(self) -> dict[str, list[int]]:
        """Processes this workbench started (empty for an attached cluster)."""
        if not self.owned or self.cluster is None:
            return {"controller": [], "engines": []}
        controller = self.cluster.controller
        engines = [
            launcher.pid
            for engine_set in self.cluster.engines.values()
            for launcher in engine_set.launchers.values()
            if launcher.pid
        ]
        return {"controller": [controller.pid] if controller and controller.pid else [], "engines": engines}

    def _watch(self) -> EngineWatch:
        """Engine deaths are noticed by the controller; for engines mpbook started on this
        host, also by their pids (and the controller's own death by its pid)."""
        by_rank = {info.rank: info.pid for info in self.engines}
        pids = [by_rank.get(rank) if self.owned else None for rank in self.ranks]
        controller = self.pids()["controller"]
        return EngineWatch(self.client, self._engine_ids, pids, controller[0] if controller else None)

    # ----------------------------------------------------------------- running work
    def _check_running(self, what: str) -> None:
        if self._stopped:
            raise NoClusterError(what)
        watch = self._watch()
        if watch.controller_dead():
            raise MpbookError(
                f"the cluster's controller (pid {watch.controller_pid}) has died; run `%mp restart` "
                f"(or Workbench.restart()) before {what}"
            )
        dead = watch.dead(self.ranks)
        if dead:
            raise EngineDiedError(dead, what=what, earlier=True)

    def _wait(
        self, result, chosen: list[int], what: str, *, stream: bool, on_tick=None, dashboard: Any = None
    ) -> list[Any]:
        """Wait for work on ``chosen`` ranks, with this call's dashboard and any standing ones
        following it; after a failed collective, rebuild the group."""
        follow = contextlib.nullcontext(on_tick)
        if dashboard or self.dashboards:
            from .dashboard import follow as _follow  # ipywidgets only when a dashboard is wanted

            follow = _follow(self, result, chosen, dashboard=dashboard, on_tick=on_tick)
        try:
            with follow as tick:
                return remote.wait(
                    result, chosen, stream=stream, on_tick=tick, on_interrupt=lambda: self.interrupt(chosen),
                    what=what, watch=self._watch(),
                )
        except EngineDiedError:
            raise
        except RankError as err:
            collective = [f.rank for f in err.failures if is_collective_failure(f)]
            if not collective:
                raise
            # The group is now broken on every rank, also on those whose cell succeeded.
            try:
                self._rebuild_group()
                why = None
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            raise CollectiveError(
                err.failures, collective=collective, ranks=chosen, what=what, rebuilt=why, timeout_s=self.timeout_s
            ) from None

    def _rebuild_group(self) -> None:
        """Destroy the process group on every rank and form it again at a fresh rendezvous."""
        ids = self._engine_ids
        self.client[ids].apply_async(engine.teardown).get(timeout=self.timeout_s)
        self._form_group(hosts=self._hosts)

    def run(
        self,
        code: str,
        ranks: str | Sequence[int] | None = None,
        *,
        stream: bool = True,
        on_tick: Callable[[], None] | None = None,
        dashboard: Any = None,
    ) -> None:
        """Execute ``code`` on every rank (or ``ranks``), with ``rank``, ``world_size``,
        ``device``, ``mesh``, ``telemetry``, ``torch`` and ``dist`` bound; stream output
        labelled by rank. ``dashboard``: True for a live dashboard of this call, or a
        :class:`mpbook.dashboard.Dashboard` to feed."""
        self._check_running("running a cell")
        chosen = parse_ranks(ranks, self.world_size)
        targets = self.engine_ids(chosen)
        result = self.client[targets].execute(code, silent=False, block=False)
        self._wait(result, chosen, "the cell", stream=stream, on_tick=on_tick, dashboard=dashboard)

    def apply(
        self,
        fn: Callable[..., Any],
        *args: Any,
        ranks: str | Sequence[int] | None = None,
        stream: bool = True,
        on_tick: Callable[[], None] | None = None,
        what: str = "the call",
        dashboard: Any = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(state, *args, **kwargs)`` on each rank; return the values in rank order.

        ``state`` is the engine's :class:`mpbook.engine.EngineState` (rank, device, mesh,
        and a cache that keeps models between calls).
        """
        self._check_running(what)
        chosen = parse_ranks(ranks, self.world_size)
        result = self.client[self.engine_ids(chosen)].apply_async(engine.call, fn, *args, **kwargs)
        return self._wait(result, chosen, what, stream=stream, on_tick=on_tick, dashboard=dashboard)

    def generate(self, prompts, *, strategy: str, model: str = "tiny", **options):
        """Generate with one strategy (``data``, ``pipeline`` or ``tensor``, degrees combinable
        with ``dp=``, ``pp=``, ``tp=``); see :func:`mpbook.inference.run` for the options."""
        from . import inference

        self._check_running(f"running {strategy} parallel")
        return inference.run(self, prompts, strategy=strategy, model=model, **options)

    def forward(self, prompts, *, strategy: str, model: str = "tiny", **options):
        """One forward pass: the result's ``logits`` hold a (prompt_len, vocab) tensor per prompt."""
        return self.generate(prompts, strategy=strategy, model=model, max_new_tokens=0, **options)

    def interrupt(self, ranks: Sequence[int] | None = None) -> None:
        """Send SIGINT to the engines of ``ranks`` (all by default): a KeyboardInterrupt there."""
        signal_engines(self.client, signal.SIGINT, self.engine_ids(ranks))

    def status(self) -> list[EngineInfo]:
        """Ask every engine afresh for its row of the engines table."""
        self._check_running("asking for status")
        self.engines = self.apply(engine.describe, stream=False, what="status")
        return self.engines

    def table(self) -> str:
        return format_engines(self.engines)

    # ----------------------------------------------------------------- lifecycle
    def restart(self) -> Workbench:
        """Bring the cluster back with the same layout: new engines if mpbook started them,
        else a fresh process group on the same engines. Models reload on demand."""
        if self.owned:
            self.stop()
            self._stopped = False
            self._engine_ids = []
            self._arm_exit_hook()
            self._launch()
            return self
        registered = sorted(self.client.ids)
        ids = [eid for eid in self._engine_ids if eid in registered]
        if len(ids) < len(self._engine_ids):
            # An engine died. mpbook cannot start engines in a cluster it did not start,
            # but engines started there since can take the dead ones' places.
            spare = [eid for eid in registered if eid not in self._engine_ids]
            if len(ids) + len(spare) < self.world_size:
                raise MpbookError(
                    f"the attached cluster has {len(registered)} engine{'s' if len(registered) != 1 else ''} left, "
                    f"{self.world_size} wanted: start engines there (e.g. `ipengine` or `ipcluster engines`), "
                    "then `%mp restart` again"
                )
            _quiet(lambda: self.client[ids].apply_async(engine.teardown).get(timeout=self.timeout_s))
            ids = sorted(ids + spare[: self.world_size - len(ids)])
            self._engine_ids = ids
        else:
            _quiet(lambda: self.client[ids].apply_async(engine.teardown).get(timeout=self.timeout_s))
        hosts = self.client[ids].apply_sync(engine.hostname)
        self._form_group(hosts=hosts)
        return self

    def stop(self) -> None:
        """Leave the process group; stop the controller and engines if mpbook started them."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self._cleanup)
        client, cluster = self.client, self.cluster
        controller = self.pids()["controller"]
        if client is not None and self._engine_ids and process_running(controller[0] if controller else None):
            live = [eid for eid in self._engine_ids if eid in set(client.ids)]
            if live and client.outstanding:
                # A cell still running would hold up the teardown, and an engine ignores
                # SIGTERM until its cell ends: interrupt it first.
                signal_engines(client, signal.SIGINT, live)
            # Destroying the group on every rank lets NCCL/gloo close their sockets cleanly.
            _quiet(lambda: client[live].apply_async(engine.teardown).get(timeout=5))
        elif self.owned:
            # No controller to reach the engines through; they are ours and on this host.
            for pid in self.pids()["engines"]:
                _quiet(lambda: os.kill(pid, signal.SIGINT) if process_running(pid) else None)
        if self.owned and cluster is not None:
            procs = list({p.pid: p for p in [*self._started_procs, *_process_trees(self.pids())]}.values())
            if client is not None:
                _quiet(client.close)
            # Engines first: each engine's nanny tells the controller it is leaving, and would
            # linger for seconds if the controller were already gone.
            _quiet(cluster.stop_engines_sync)
            _quiet(cluster.stop_controller_sync)
            _reap(procs)
        elif client is not None:
            _quiet(client.close)

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"{self.world_size} engines on {self.device_type}"
        return f"<Workbench {'started' if self.owned else 'attached'}, {state}>"


def _stop_at_exit(ref: weakref.ref) -> None:
    wb = ref()
    if wb is not None:
        wb.stop()


def _quiet(fn: Callable[[], Any]) -> None:
    """Run a best-effort clean-up step; a failure there must not hide the real error."""
    try:
        fn()
    except Exception:
        logging.getLogger("mpbook").debug("clean-up step failed", exc_info=True)


def _process_trees(pids: dict[str, list[int]]):
    """The processes mpbook started, with their children (schedulers, nannies)."""
    import psutil

    found = []
    for pid in [p for group in pids.values() for p in group]:
        try:
            proc = psutil.Process(pid)
            found.append(proc)
            found.extend(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return found


def _reap(procs, timeout_s: float = 5.0) -> None:
    """End what outlived ipyparallel's own stop: kill any process that ignores SIGTERM."""
    # The nannies would end by themselves once they see their engine gone and have told the
    # controller, a second later; with the whole cluster going, that message has no reader.
    for proc in procs:
        _quiet(proc.terminate)
    alive = _wait_gone(procs, timeout_s)
    for proc in alive:
        _quiet(proc.kill)
    _wait_gone(alive, timeout_s)


def _wait_gone(procs, timeout_s: float) -> list:
    """Wait until ``procs`` have ended; return those still running at the deadline.

    A zombie has ended: the nannies, orphaned when their engine exits, wait for PID 1 to
    reap them, which can take seconds in a container (psutil.wait_procs would wait for it).
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [proc for proc in procs if process_running(proc.pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
