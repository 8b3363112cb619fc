"""Cluster lifecycle: start or attach, form the process group, restart, stop, reap.

Ranks follow hosts, then engine ids (:func:`mpbook.cluster.hosts.rank_order`). A cluster that
mpbook starts lives on this host and listens on loopback only, or, started with ``hosts``,
has its engines on those hosts (ipyparallel's SSH, MPI or Slurm launcher) and listens on the
one address the hosts share; it is stopped by ``stop()``, by leaving the ``with`` block, or
at interpreter exit (a notebook kernel's shutdown included). A cluster that mpbook attaches
to is left running: mpbook only leaves the process group it formed.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..devices import EngineSpec, visible_gpu_count
from ..engine import group, network
from ..engine import rendezvous as meeting
from ..errors import EngineDiedError, MpbookError, NoClusterError
from ..layout import ranks_by_host
from ..options import DEFAULT_TIMEOUT_S, check_engine_count, check_threads, check_timeout
from ..protocol import EngineInfo, Rendezvous
from . import calls, crash_report
from .health import EngineWatch, process_running, signal_engines
from .hosts import HostSlots, check_hosts, controller_address, rank_order, span_warning
from .transport import (
    TransportChoice, attached_transport, choose_transport, configure_mpi_engines, mpi_shared_memory_files, remove_files,
)

# For engines to register after they are launched: seconds when the machine is idle, minutes
# when every core is busy (each engine imports torch first).
ENGINE_TIMEOUT_S = 120.0
# ipyparallel's SSH launcher starts engines one after another, each over a few ssh calls.
REMOTE_ENGINE_TIMEOUT_S = 180.0
# ipyparallel's default heartbeat (3 s) makes engine registration take ~6.5 s for two
# engines here; 250 ms brings it to ~2 s and still notices a dead engine within seconds.
HEARTBEAT_MS = 250
# ipyparallel unregisters an engine after 10 missed beats, 2.5 s at this period: a 2-core
# machine with every core busy held beats up that long, and live engines were reported dead
# mid-run. 40 (10 s) still names a dead engine well within the collective timeout (a killed
# one is named at once anyway: its nanny, or mpbook's watch of its pid, tells).
HEARTBEAT_MISSES = 40

log = logging.getLogger("mpbook")


class ControllerStoppedError(MpbookError):
    """The controller of a cluster being started exited before it was up."""


class EnginesStoppedError(MpbookError):
    """The engines' launcher of a cluster being started (an engine, or mpiexec) exited before
    every engine had registered."""

    said = ""  # the launcher's last lines

    @classmethod
    def of(cls, launcher, transport: TransportChoice, logs: str) -> EnginesStoppedError:
        said = last_words(launcher)
        what = "mpiexec, which started the engines," if transport.name == "mpi" else "an engine"
        error = cls(f"{what} exited while the cluster was starting" + (f"; it wrote: {said}" if said else "")
                    + f"; the logs are in {logs}")
        error.said = said
        return error


def last_words(launcher, lines: int = 3) -> str:
    """The last lines a launched process wrote (its error, when it stopped), in one line."""
    try:
        output = launcher.get_output() if launcher is not None else ""
    except Exception:
        return ""
    return " | ".join(line.strip() for line in (output or "").strip().splitlines()[-lines:])


class Cluster:
    """Engines, one per device, joined in one torch.distributed process group."""

    def __init__(self, *, owned: bool, spec: EngineSpec, timeout_s: float, rendezvous: str, client=None,
                 transport: TransportChoice | None = None):
        # Use Cluster.start() or Cluster.attach(), which check the options.
        self.owned = owned
        self.spec = spec
        # What mpbook's collectives travel over (mpbook.cluster.transport).
        self.transport = transport or TransportChoice("nccl" if spec.use_gpu else "gloo")
        self.timeout_s = timeout_s
        self.rendezvous_kind = rendezvous
        self.client = client
        self.ipp_cluster = None  # ipyparallel's Cluster, for one mpbook started
        self.engines: list[EngineInfo] = []
        self._engine_ids: list[int] = []
        self._hosts: list[str] | None = None  # by rank, for an attached cluster
        self.stopped = False
        self._started_procs: list = []  # psutil.Process of everything launched, for the last reap
        self._shared_memory: set[str] = set()  # MPICH's files of the engines' MPI world, removed at stop
        self.crash_reports: str | None = None  # the folder of the local engines' crash reports (crash_report)
        self._rendezvous: Rendezvous | None = None  # where the current process group met
        # Engines on other hosts (start with hosts=...): the slots asked for, the launcher,
        # the Python there, and the address of this host that they reach.
        self.slots: tuple[HostSlots, ...] = ()
        self.launcher = ""
        self.remote_python: str | None = None
        self.address: str | None = None
        self._multiplex = None  # mpbook.cluster.ssh.Multiplex: the launcher's shared ssh connections
        self.links: list | None = None  # the last measurement of the links (mpbook.bench_links)
        # The process whose end ends the cluster's processes (mpbook.cluster.launch's owner watch).
        self.owner_pid = os.getpid()
        self._arm_exit_hook()

    def _arm_exit_hook(self) -> None:
        # A partial per cluster, so that unregistering one leaves the others armed.
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
        transport: str = "auto",
        hosts=None,
        ip: str | None = None,
        launcher: str = "ssh",
        python: str | None = None,
    ) -> Cluster:
        """Start a local cluster: one engine per visible GPU, or ``n`` CPU engines.

        ``threads``: intra-op threads per engine (default: the cores divided among engines).
        ``transport``: for CPU engines, ``"mpi"`` (engines started by mpiexec, collectives over
        MPICH's shared memory), ``"gloo"``, or ``"auto"``: MPI when it is installed.

        ``hosts``: engines on other hosts instead, e.g. ``"hosta:2,hostb:2"`` (names as
        ``ssh`` knows them), started by ipyparallel's ``launcher`` (``ssh``, ``mpi`` or
        ``slurm``) with ``python`` there (default: this Python's path); the controller
        listens on ``ip``, default the address of this host on the route to them."""
        timeout_s = check_timeout(timeout_s)
        threads = check_threads(threads)
        if hosts is not None:
            return cls._start_on_hosts(hosts, n=n, gpu=gpu, timeout_s=timeout_s, threads=threads,
                                       transport=transport, ip=ip, launcher=launcher, python=python)
        if ip is not None:
            raise MpbookError("--ip is for engines on other hosts (--hosts); a local cluster listens on loopback only")
        spec = EngineSpec.choose(n, cpu=cpu, gpu=gpu)
        if threads is not None:
            spec = dataclasses.replace(spec, threads=threads)
        choice = choose_transport(transport, use_gpu=spec.use_gpu)
        return cls._launched(lambda: cls(owned=True, spec=spec, timeout_s=timeout_s, rendezvous="file", transport=choice))

    @classmethod
    def _start_on_hosts(cls, hosts, *, n, gpu, timeout_s, threads, transport, ip, launcher, python) -> Cluster:
        """Check everything about engines on other hosts before anything starts, then start."""
        from .ssh import check_launcher

        slots = check_hosts(hosts)
        launcher = check_launcher(launcher)
        total = sum(slot.n for slot in slots)
        if n is not None and n != total:
            raise MpbookError(f"-n {n} with --hosts asking for {total} engines; leave out -n (the hosts say how many)")
        if transport == "mpi" and launcher != "mpi":
            raise MpbookError("--transport mpi across hosts needs engines started by mpiexec: add --launcher mpi, "
                              "or leave out --transport")
        if transport not in ("auto", "mpi", "gloo"):
            choose_transport(transport, use_gpu=gpu)  # its error names the choices
        address = controller_address(slots, ip)
        if launcher == "mpi" and transport != "gloo":
            choice = TransportChoice("mpi")
        else:
            choice = TransportChoice("nccl" if gpu else "gloo")
        # threads=0: each engine takes its host's cores divided among that host's engines.
        spec = EngineSpec(n=total, use_gpu=gpu, threads=threads or 0)
        def make() -> Cluster:
            cluster = cls(owned=True, spec=spec, timeout_s=timeout_s, rendezvous="tcp", transport=choice)
            cluster.slots, cluster.launcher, cluster.remote_python, cluster.address = slots, launcher, python, address
            return cluster

        return cls._launched(make)

    @staticmethod
    def _launched(make: Callable[[], Cluster]) -> Cluster:
        """Launch a new cluster; once more if its controller or its MPI engines stopped while
        starting, and over gloo when MPI failed twice and the transport was MPI by choice.

        The controller binds ports it chose at random a moment earlier; another process
        can take one in between (seen with several clusters starting at once on a busy
        host), and the controller then exits at start. A second try picks other ports.
        MPI's start can fail on its own, rarely (a rank aborted in MPI_Init when UCX read
        its shared-memory peer's address); a second start has not failed alike.
        """
        cluster = make()
        tried: set[str] = set()
        while True:
            try:
                cluster._launch()
                return cluster
            except ControllerStoppedError as exc:
                if "controller" in tried:
                    raise
                tried.add("controller")
                log.warning("mpbook: %s; starting the cluster again", exc)
                transport = cluster.transport
            except EnginesStoppedError as exc:
                transport = cluster.transport
                if transport.name != "mpi":
                    raise
                if "mpi" not in tried:
                    tried.add("mpi")
                    log.warning("mpbook: %s; starting the cluster again", exc)
                elif transport.may_fall_back:
                    transport = TransportChoice("gloo", note=f"MPI did not start the engines ({exc.said or 'no output'}): "
                                                              "collectives over gloo, ~1 ms each")
                else:
                    raise MpbookError(f"MPI did not start the engines, twice ({exc}); start with transport='gloo' "
                                      "instead") from exc
            cluster = make()
            cluster.transport = transport

    def _launch(self) -> None:
        """Start the controller and engines of an owned cluster and form the process group."""
        import ipyparallel as ipp
        from traitlets.config import Config

        # Imported here, not with this module: the engines and the controller run launch as
        # __main__ (`python -m`), and importing the package must not have imported it already
        # (runpy warns in every engine's log that it then runs a second copy).
        from .launch import OWNER_ENV

        spec = self.spec
        config = Config()
        launch = [sys.executable, "-m", "mpbook.cluster.launch"]
        config.LocalControllerLauncher.controller_cmd = [*launch, "controller"]
        config.LocalControllerLauncher.environment = {OWNER_ENV: str(self.owner_pid)}
        config.LocalEngineLauncher.engine_cmd = [*launch, "engine"]
        threads = str(spec.threads)
        environment = {
            OWNER_ENV: str(self.owner_pid),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
        }
        if not self.slots:  # engines on this host: a fatal signal's report each, read if one dies
            self.crash_reports = crash_report.make_folder()
            environment[crash_report.FOLDER_ENV] = self.crash_reports
        config.LocalEngineSetLauncher.environment = environment
        engines = "local"
        # The controller listens on loopback only, or on the one address the hosts reach.
        controller_ip = self.address or "127.0.0.1"
        # Schedulers in threads rather than 8 forked processes: a faster start, and
        # fewer processes to compete for the cores with the engines.
        controller_args = [f"--HeartMonitor.period={HEARTBEAT_MS}",
                           f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
                           "--IPController.use_threads=True"]
        if self.slots:
            from .ssh import configure_engines, engine_environment

            # Engines elsewhere dial the address itself: a host name might not resolve there.
            controller_args.append(f"--IPController.location={controller_ip}")
            threads_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if spec.threads else {}
            if self.launcher == "ssh":
                from .ssh import Multiplex

                self._multiplex = Multiplex()
            engines = configure_engines(config, self.launcher, self.slots, python=self.remote_python,
                                        environment=engine_environment(threads_env),
                                        multiplex=self._multiplex.options if self._multiplex else ())
        elif self.transport.name == "mpi":
            configure_mpi_engines(config, self.transport, [*launch, "engine"], environment)
            engines = "mpi"
        self.ipp_cluster = ipp_cluster = ipp.Cluster(
            n=spec.n,
            engines=engines,
            config=config,
            controller_ip=controller_ip,
            controller_args=controller_args,
            # Local engines find the controller's connection file themselves, so they start
            # (and import torch) while the controller is still coming up; engines elsewhere
            # get it in their environment (and by scp), as ipyparallel sends it.
            send_engines_connection_env=bool(self.slots),
            delay=0,
            log_level=logging.WARNING,
        )
        try:
            ipp_cluster.start_cluster_sync()
            # ipyparallel has just registered its own exit hook, which stops the processes
            # without leaving the process group (the rendezvous folder would stay behind).
            # atexit runs hooks last-in first-out: register ours again so that it runs first.
            atexit.unregister(self._cleanup)
            atexit.register(self._cleanup)
            self.client = ipp_cluster.connect_client_sync()
            self._wait_for_engines(spec.n, REMOTE_ENGINE_TIMEOUT_S if self.slots else ENGINE_TIMEOUT_S)
            self._form_group(hosts=None)
            # Children (the controller's heart monitor, the nannies) can no longer be found
            # from a parent that was killed; remember them now to reap them at stop.
            self._started_procs = process_trees(self.pids())
            # MPICH's shared-memory file of the engines' world, read while they map it: an
            # engine killed later takes its peers down with it (MPI aborts them), and
            # once no process maps the file the stop could not find it any more.
            self._shared_memory = mpi_shared_memory_files(p.pid for p in self._started_procs)
        except BaseException as exc:
            # (read before stop, which removes the controller's output file)
            said = last_words(ipp_cluster.controller)
            self.stop()
            if isinstance(exc, (KeyboardInterrupt, MpbookError)):
                raise
            where = f"its logs are in {ipp_cluster.profile_dir}/log"
            if isinstance(exc, RuntimeError) and str(exc).startswith("Controller stopped"):
                raise ControllerStoppedError(
                    f"the cluster's controller stopped while starting ({exc}" + (f"; it wrote: {said}" if said else "")
                    + f"); {where}") from exc
            raise MpbookError(f"the cluster did not come up ({type(exc).__name__}: {exc}); {where}") from exc

    def _wait_for_engines(self, n: int, timeout_s: float) -> None:
        """Wait until ``n`` engines have registered; raise at once when their launcher exits.

        ipyparallel notices a stopped engine set through a callback on its own event loop,
        which does not always run while this thread waits: a launcher that had exited was
        then seen only at the timeout, minutes later. So the launchers' processes are polled
        here as well."""
        from ipyparallel.error import EngineError

        logs = f"{self.ipp_cluster.profile_dir}/log"
        # interactive=False: no progress bar in the notebook for a two-second wait.
        registered = self.client.wait_for_engines(n, timeout=timeout_s, interactive=False, block=False)
        while True:
            try:
                registered.result(timeout=0.2)
                return
            except EngineError as exc:
                if "stopped" not in str(exc):
                    raise
                launcher = next(iter(self._exited_engine_launchers()), None)
                raise EnginesStoppedError.of(launcher, self.transport, logs) from exc
            except TimeoutError:
                if registered.done():  # ipyparallel's own timeout
                    raise
            exited = self._exited_engine_launchers()
            if exited:
                raise EnginesStoppedError.of(exited[0], self.transport, logs)

    def _exited_engine_launchers(self) -> list:
        """The launchers on this host (an engine, or mpiexec) whose process has exited."""
        import psutil

        exited = []
        for launcher in self._local_engine_launchers():
            process = getattr(launcher, "process", None)
            if process is None:  # not started yet
                continue
            try:
                gone = not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                exited.append(launcher)
        return exited

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
        transport: str = "auto",
    ) -> Cluster:
        """Join a cluster that is already running (``ipcluster start``, MPI, SSH, Slurm ...).

        Waits up to ``wait_s`` for the cluster (at most 10 s for its connection file to appear)
        and for ``n`` engines (default: those registered, at least one).
        The process group's rendezvous is a file when every engine is on one host, else a
        TCP store served by rank 0 at its own address.
        """
        import ipyparallel as ipp
        from IPython.paths import get_ipython_dir

        if n is not None:
            check_engine_count(n)
        timeout_s = check_timeout(timeout_s)
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
            client = _connect(profile or "default", cluster_id or "", wait_s)
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
        chosen = sorted(client.ids)[: n or None]
        found = client[chosen].apply_sync(network.hostname)
        ids = rank_order(chosen, found)  # ranks by host
        hosts = [found[chosen.index(eid)] for eid in ids]
        kind = rendezvous or ("file" if len(set(hosts)) == 1 else "tcp")
        spec = EngineSpec(n=len(ids), use_gpu=False, threads=0)
        cluster = cls(owned=False, spec=spec, timeout_s=timeout_s, rendezvous=kind, client=client)
        cluster._engine_ids = ids
        if not cpu:
            cluster.spec = EngineSpec(n=len(ids), use_gpu=cluster._engines_have_gpus(ids, hosts), threads=0)
        try:
            cluster.transport = attached_transport(client, ids, transport, use_gpu=cluster.spec.use_gpu)
        except BaseException:
            client.close()
            raise
        try:
            cluster._form_group(hosts=hosts)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _engines_have_gpus(self, ids: list[int], hosts: list[str]) -> bool:
        counts = self.client[ids].apply_sync(visible_gpu_count)
        per_host: dict[str, int] = {}
        for host in hosts:
            per_host[host] = per_host.get(host, 0) + 1
        return all(count >= per_host[host] for count, host in zip(counts, hosts))

    def _form_group(self, hosts: list[str] | None) -> None:
        """Rank the engines, make the rendezvous on rank 0, and init the process group on all."""
        threads = [self.spec.threads or None] * self.spec.n
        if not self._engine_ids:
            ids = sorted(self.client.ids)[: self.spec.n]
            if self.slots:
                # Ranks by host, in the order the hosts were given.
                found = self.client[ids].apply_sync(network.hostname)
                order = rank_order(ids, found, first=_host_names(self.slots, found))
                hosts = [found[ids.index(eid)] for eid in order]
                ids = order
            self._engine_ids = ids
        ids = self._engine_ids
        hosts = hosts or (self._hosts if self.slots else None) or [""] * len(ids)
        self._hosts = hosts
        if self.slots and not self.spec.threads:
            # Each host's cores, shared among that host's engines.
            cores = self.client[ids].apply_sync(_usable_cores)
            threads = [max(1, c // hosts.count(h)) for c, h in zip(cores, hosts)]
        rdzv: Rendezvous = self.client[ids[0]].apply_sync(meeting.make_rendezvous, self.rendezvous_kind, self.address)
        self._rendezvous = rdzv
        table = {}
        for rank, (eid, host) in enumerate(zip(ids, hosts)):
            table[eid] = dict(
                rank=rank,
                world_size=len(ids),
                local_rank=hosts[:rank].count(host),
                engine_id=eid,
                use_gpu=self.spec.use_gpu,
                threads=threads[rank],
                rendezvous=rdzv,
                timeout_s=self.timeout_s,
                mpi=self.transport.name == "mpi",
                toward=self.address,
            )
        result = self.client[ids].apply_async(group.setup_from_table, table)
        self.engines = calls.wait(result, self.ranks, stream=False, what="forming the process group")

    def rebuild_group(self) -> None:
        """Destroy the process group on every rank and form it again at a fresh rendezvous;
        the engines keep their loaded models (their collectives move to the new group)."""
        leaving = self.client[self._engine_ids].apply_async(group.teardown, keep_model=True)
        try:
            leaving.get(timeout=self.timeout_s)
        except TimeoutError:
            # An engine still busy (or stuck) cannot take part in a new group: say which.
            # (every rank, should the last one answer between the timeout and this line)
            busy = [rank for rank, msg_id in zip(self.ranks, leaving.msg_ids)
                    if msg_id in self.client.outstanding] or self.ranks
            raise MpbookError(
                f"rank{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} did not leave the process group "
                f"within the {self.timeout_s:g} s timeout (still running earlier work); run `%mp restart` "
                "(or Workbench.restart()) to bring the cluster back"
            ) from None
        self._form_group(hosts=self._hosts)

    # ----------------------------------------------------------------- properties
    @property
    def world_size(self) -> int:
        return len(self._engine_ids)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    @property
    def device_type(self) -> str:
        return "cuda" if self.spec.use_gpu else "cpu"

    def engine_ids(self, ranks: Sequence[int] | None = None) -> list[int]:
        return [self._engine_ids[r] for r in (self.ranks if ranks is None else ranks)]

    @property
    def hosts(self) -> list[str]:
        """Each rank's host name, by rank (empty names for a local cluster)."""
        return list(self._hosts or [])

    @property
    def ranks_at_once(self) -> int | None:
        """How many ranks can compute at the same time, where that is fewer than all of them:
        CPU engines that outnumber their host's cores (at most one rank per core), as each
        engine reported its cores when the group formed. None: every rank can (GPU engines,
        a core per engine, or cores not known)."""
        if self.spec.use_gpu or not self.engines or any(info.cores <= 0 for info in self.engines):
            return None
        slots = sum(min(engines, cores) for engines, cores in self._engines_and_cores_by_host().values())
        return slots if slots < self.world_size else None

    def _engines_and_cores_by_host(self) -> dict[str, tuple[int, int]]:
        """Each host's engines and the cores they may use, as the engines reported them."""
        hosts = [info.host for info in self.engines]
        return {info.host: (hosts.count(info.host), info.cores) for info in self.engines}

    def layout_warning(self, layout) -> str | None:
        """One line when ``layout`` puts a tensor or expert group across hosts."""
        return span_warning(layout, self.hosts)

    def pids(self) -> dict[str, list[int]]:
        """Processes this cluster's owner started (empty for an attached cluster)."""
        if not self.owned or self.ipp_cluster is None:
            return {"controller": [], "engines": []}
        controller = self.ipp_cluster.controller
        engines = [launcher.pid for launcher in self._local_engine_launchers() if launcher.pid]
        return {"controller": [controller.pid] if controller and controller.pid else [], "engines": engines}

    def _local_engine_launchers(self) -> list:
        """The engine launchers whose process runs on this host: one per engine, or (MPI) one
        mpiexec whose process tree holds the engines. Not an SSH launcher (its pid is the
        engine's on its host) nor a batch launcher (its engines run where the scheduler put them)."""
        from ipyparallel.cluster.launcher import LocalProcessLauncher, SSHLauncher

        found = []
        for engine_set in self.ipp_cluster.engines.values():
            launchers = getattr(engine_set, "launchers", None)
            for launcher in launchers.values() if launchers is not None else [engine_set]:
                if isinstance(launcher, LocalProcessLauncher) and not isinstance(launcher, SSHLauncher):
                    found.append(launcher)
        return found

    def watch(self) -> EngineWatch:
        """Engine deaths are noticed by the controller; for engines mpbook started on this
        host, also by their pids (and the controller's own death by its pid)."""
        here = socket.gethostname()
        # A pid means something only on its own host; the controller watches the others.
        by_rank = {info.rank: info.pid for info in self.engines if info.host == here}
        pids = [by_rank.get(rank) if self.owned else None for rank in self.ranks]
        controller = self.pids()["controller"]
        hosts = [info.host for info in sorted(self.engines, key=lambda info: info.rank)]
        return EngineWatch(self.client, self._engine_ids, pids, controller[0] if controller else None, hosts=hosts,
                           crash_reports=self.crash_reports)

    def check_running(self, what: str) -> None:
        """Raise a clear error when the cluster cannot take work: stopped, or a process died."""
        if self.stopped:
            raise NoClusterError(what)
        watch = self.watch()
        if watch.controller_dead():
            raise MpbookError(
                f"the cluster's controller (pid {watch.controller_pid}) has died; run `%mp restart` "
                f"(or Workbench.restart()) before {what}"
            )
        dead = watch.dead(self.ranks)
        if dead:
            raise EngineDiedError(dead, what=what, earlier=True, hosts=watch.hosts, causes=watch.causes(dead))

    def interrupt(self, ranks: Sequence[int] | None = None) -> None:
        """Send SIGINT to the engines of ``ranks`` (all by default): a KeyboardInterrupt there."""
        signal_engines(self.client, signal.SIGINT, self.engine_ids(ranks))

    def table(self) -> str:
        transport = self.transport
        line = {
            "mpi": ("collectives: MPI (mpi4py), engines started by mpiexec on the hosts" if self.slots
                    else "collectives: MPI (mpi4py over MPICH's shared memory), engines started by mpiexec"),
            "gloo": (f"collectives: gloo (TCP on {self.address}, the address the hosts share)" if self.slots
                     else "collectives: gloo (TCP over loopback)" if self.owned else "collectives: gloo"),
            "nccl": "collectives: NCCL",
        }[transport.name]
        if transport.note:
            line += f"; {transport.note}"
        at_once = self.ranks_at_once
        if at_once is not None:
            cores = sum(cores for _, cores in self._engines_and_cores_by_host().values())
            line += (f"\ncores: {self.world_size} engines share {cores}, so {at_once} ranks compute at once "
                     "(a pipeline takes no more micro-batches than its stages that can)")
        return format_engines(self.engines) + "\n" + line

    # ----------------------------------------------------------------- lifecycle
    def restart(self) -> Cluster:
        """Bring the cluster back with the same layout: new engines if mpbook started them,
        else a fresh process group on the same engines. Models reload on demand."""
        if self.owned:
            self.stop()
            self.stopped = False
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
            _quiet(lambda: self._leave_group(ids, timeout_s=self.timeout_s))
            ids = sorted(ids + spare[: self.world_size - len(ids)])
            self._engine_ids = ids
        else:
            _quiet(lambda: self._leave_group(ids, timeout_s=self.timeout_s))
        hosts = self.client[ids].apply_sync(network.hostname)
        self._form_group(hosts=hosts)
        return self

    def _leave_group(self, live: list[int], *, timeout_s: float) -> None:
        """Every live engine leaves the process group; then rank 0 removes the rendezvous
        folder, which no rank's store uses any more (an attached cluster's engines stay up,
        so their exit would not)."""
        if not live:
            return
        self.client[live].apply_async(group.teardown).get(timeout=timeout_s)
        if self._engine_ids[0] in live:
            self.client[self._engine_ids[0]].apply_async(meeting.remove_ended_folders).get(timeout=timeout_s)

    def stop(self) -> None:
        """Leave the process group; stop the controller and engines if mpbook started them."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self._cleanup)
        client, ipp_cluster = self.client, self.ipp_cluster
        controller = self.pids()["controller"]
        if client is not None and self._engine_ids and process_running(controller[0] if controller else None):
            live = [eid for eid in self._engine_ids if eid in set(client.ids)]
            if live and client.outstanding:
                # A cell still running would hold up the teardown, and an engine ignores
                # SIGTERM until its cell ends: interrupt it first.
                signal_engines(client, signal.SIGINT, live)
            # Destroying the group on every rank lets NCCL/gloo close their sockets cleanly.
            _quiet(lambda: self._leave_group(live, timeout_s=5))
        elif self.owned:
            # No controller to reach the engines through; they are ours and on this host.
            # (psutil refuses to signal a recorded process whose pid another one has taken.)
            engines = set(self.pids()["engines"])
            for proc in self._started_procs:
                if proc.pid in engines:
                    _quiet(lambda: proc.send_signal(signal.SIGINT))
        if self.owned and ipp_cluster is not None:
            running = self._started_and_running()
            procs = list({p.pid: p for p in [*self._started_procs, *running]}.values())
            shared_memory = self._shared_memory | mpi_shared_memory_files(p.pid for p in running)
            if client is not None:
                _quiet(client.close)
            left_remotely = {}
            if self.slots and self.launcher == "ssh":
                from .ssh import remote_files

                left_remotely = remote_files(ipp_cluster.engines.values())
            # Engines first: each engine's nanny tells the controller it is leaving, and would
            # linger for seconds if the controller were already gone.
            _quiet(ipp_cluster.stop_engines_sync)
            _forget_engine_sets(ipp_cluster)
            if left_remotely:
                from .ssh import remove_remote_files

                # their output files and the connection files ipyparallel sent there
                _quiet(lambda: remove_remote_files(left_remotely, self._multiplex.options if self._multiplex else ()))
            _quiet(ipp_cluster.stop_controller_sync)
            _reap(procs)
            remove_files(shared_memory)
            if self._multiplex is not None:
                self._multiplex.close([slot.name for slot in self.slots])
                self._multiplex = None
            # Rank 0 removes its rendezvous folder on its way out, unless it was killed; the
            # engines of a cluster mpbook started are on this host, so the folder is here.
            rdzv = self._rendezvous
            if rdzv is not None and rdzv.kind == "file":
                _quiet(lambda: shutil.rmtree(os.path.dirname(rdzv.path), ignore_errors=True))
        elif client is not None:
            _quiet(client.close)
        # Every report of the engines, with any an engine killed outright could not remove.
        crash_report.remove_folder(self.crash_reports)

    def _started_and_running(self) -> list:
        """The processes this cluster started that still run, with their children now.

        Each is the process recorded at start, not whatever has its pid now: pids wrap (at
        32768 on the machines here), and in a long session the pid of an engine that died
        may already belong to another cluster's engine, which a stop must not end."""
        import psutil

        found = []
        # (A start that failed before recording them: its processes are seconds old.)
        for proc in self._started_procs or process_trees(self.pids()):
            if not proc.is_running():  # ended, or its pid taken by another process
                continue
            found.append(proc)
            try:
                found.extend(proc.children(recursive=True))
            except psutil.Error:
                pass
        return found

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def format_engines(infos: Sequence[EngineInfo]) -> str:
    """The engines table, as text."""
    from ..units import format_bytes

    rows = [("rank", "host", "pid", "device", "backend", "transport", "threads", "free / total memory")]
    for i in infos:
        device = i.device if i.device_name == "cpu" else f"{i.device} ({i.device_name})"
        memory = f"{format_bytes(i.memory_free_bytes, unit='GiB')} / {format_bytes(i.memory_total_bytes, unit='GiB')}"
        rows.append((str(i.rank), i.host, str(i.pid), device, i.backend, i.transport or i.backend, str(i.threads), memory))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    groups = ranks_by_host([i.host for i in infos])
    if len(groups) < 2:
        return "\n".join(lines)
    # Several hosts: the rows of each host under a line naming it (ranks are grouped by host).
    out = ["  " + lines[0]]
    for host, ranks in groups:
        out.append(f"{host}: {len(ranks)} engine{'s' if len(ranks) != 1 else ''}, ranks {ranks[0]}-{ranks[-1]}"
                   if len(ranks) > 1 else f"{host}: 1 engine, rank {ranks[0]}")
        out.extend("  " + lines[1 + r] for r in ranks)
    return "\n".join(out)


def _connect(profile: str, cluster_id: str, wait_s: float):
    """A client of the running cluster of ``profile`` / ``cluster_id``.

    ipyparallel's client waits (here up to 10 s) for the controller's connection file to
    appear, then reads it once; the controller writes that file in place, so a client that
    comes just as it starts may read it empty or half-written. Such a read is tried again
    until ``wait_s`` has passed."""
    import json

    import ipyparallel as ipp

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ipp.Client(profile=profile, cluster_id=cluster_id, timeout=min(wait_s, 10))
        except json.JSONDecodeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _usable_cores() -> int:
    from ..devices import usable_cores

    return usable_cores()


def _host_names(slots: Sequence[HostSlots], found: Sequence[str]) -> list[str]:
    """The engines' own host names in the order of ``slots`` (a slot may name a host by an
    alias or its short name; hosts that match no slot follow in engine-id order)."""
    names = []
    for slot in slots:
        short = slot.name.split("@")[-1].split(".")[0]
        names += [h for h in dict.fromkeys(found) if h not in names and (h == slot.name or h.split(".")[0] == short)]
    return names


def _stop_at_exit(ref: weakref.ref) -> None:
    cluster = ref()
    if cluster is not None:
        cluster.stop()


def _quiet(fn: Callable[[], Any]) -> None:
    """Run a best-effort clean-up step; a failure there must not hide the real error."""
    try:
        fn()
    except Exception:
        log.debug("clean-up step failed", exc_info=True)


def process_trees(pids: dict[str, list[int]]):
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


def _forget_engine_sets(ipp_cluster) -> None:
    """Engine sets that ipyparallel's stop left behind: remove their local output files and drop
    them from its Cluster, which mpbook stops (and reaps) itself.

    ipyparallel reads each engine set's output as UTF-8 text after stopping it, and it may hold
    any bytes (a library's raw write; mpiexec.gforker forwards only the first byte of a
    character over 0x7f, see ``transport.GFORKER_TEXT_ENV``); the stop then fails there and
    leaves the set. Its Cluster would stop it again
    when it is garbage-collected, at whatever moment that falls in (seen: inside another
    test's ``ast.parse``, which CPython 3.11 then failed with a SystemError)."""
    from ipyparallel.cluster.launcher import SSHLauncher

    for engine_set in ipp_cluster.engines.values():
        for launcher in [engine_set, *getattr(engine_set, "launchers", {}).values()]:
            path = getattr(launcher, "output_file", "")
            if path and not isinstance(launcher, SSHLauncher):  # an SSH engine's output is on its host
                _quiet(lambda path=path: os.remove(path) if os.path.isfile(path) else None)
    ipp_cluster.engines.clear()
    ipp_cluster.shutdown_atexit = False


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


def _still_running(proc) -> bool:
    """Whether ``proc`` (a psutil.Process) still runs: not ended, not a zombie, and its pid not
    taken by another process since."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs, timeout_s: float) -> list:
    """Wait until ``procs`` have ended; return those still running at the deadline.

    A zombie has ended: the nannies, orphaned when their engine exits, wait for PID 1 to
    reap them, which can take seconds in a container (psutil.wait_procs would wait for it).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [proc for proc in procs if _still_running(proc)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
