"""Engines on other hosts, started by ipyparallel's own launchers.

- ``ssh`` (default): ipyparallel's ``SSHEngineSetLauncher`` runs mpbook's engine command
  on each host over ``ssh`` (keys and host names as ``ssh`` itself knows them), after
  sending the controller's connection file with ``scp``; the connection info also travels
  in the engines' environment, as ipyparallel does it.
- ``mpi``: ipyparallel's ``MPIEngineSetLauncher``; the hosts go to ``mpiexec -hosts``.
- ``slurm``: ipyparallel's ``SlurmEngineSetLauncher`` writes a batch script and submits it
  with ``sbatch``; the hosts go to ``--nodelist``.

Engines on other hosts have no owner watch (the notebook's pid means nothing there): when
the controller dies with the notebook, they stop after missing its heartbeat for a few
seconds (ipyparallel's ``max_heartbeat_misses``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import MpbookError
from .hosts import HostSlots

LAUNCHERS = ("ssh", "mpi", "slurm")
# What engines on other hosts need from this process's environment to find mpbook's code and
# the models as this host does (the same paths on every host, as for the Python itself).
FORWARDED_ENV = ("PYTHONPATH", "MPBOOK_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Heartbeats the engines may miss before they stop themselves (ipyparallel's default is 50,
# 12.5 s at mpbook's period): a controller gone with its notebook takes them with it.
HEARTBEAT_MISSES = 20
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3")


def check_launcher(launcher: str) -> str:
    if launcher not in LAUNCHERS:
        raise MpbookError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    return launcher


def engine_environment(threads: dict[str, str]) -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {**env, **threads, "TOKENIZERS_PARALLELISM": "false"}


def configure_engines(config, launcher: str, slots: Sequence[HostSlots], *, python: str | None,
                      environment: dict[str, str], multiplex: Sequence[str] = ()):
    """Set ipyparallel's ``launcher`` in ``config`` for ``slots``; returns the ``engines=``
    name (or class) for ``ipyparallel.Cluster``. ``multiplex``: ssh options that share one
    connection per host (:class:`Multiplex`)."""
    python = python or sys.executable
    engine_cmd = [python, "-m", "mpbook.cluster.launch", "engine", f"--IPEngine.max_heartbeat_misses={HEARTBEAT_MISSES}"]
    if launcher == "ssh":
        ssh = config.SSHEngineSetLauncher
        ssh.engines = {slot.name: slot.n for slot in slots}
        ssh.remote_python = python
        ssh.engine_cmd = engine_cmd
        ssh.environment = environment
        # ssh and scp must never stop to ask (a notebook has no terminal to answer in), and
        # give up on a host that stops answering rather than hang a stop or a restart.
        ssh.ssh_args = [*SSH_OPTIONS, *multiplex]
        ssh.scp_args = [*SSH_OPTIONS, *multiplex, "-q"]
        from ..compat.ipyparallel import ssh_engine_set_launcher

        return ssh_engine_set_launcher()
    if launcher == "mpi":
        mpi = config.MPIEngineSetLauncher
        # MPICH's Hydra launcher (it reaches the hosts over ssh itself), beside this Python
        # when the mpich wheel put it there.
        beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        mpi.mpi_cmd = [beside if os.access(beside, os.X_OK) else "mpiexec"]
        mpi.engine_cmd = engine_cmd
        mpi.mpi_args = ["-hosts", ",".join(f"{slot.name}:{slot.n}" for slot in slots)]
        mpi.environment = environment
        return "mpi"
    if launcher == "slurm":
        slurm = config.SlurmEngineSetLauncher
        slurm.engine_cmd = engine_cmd
        slurm.environment = environment
        slurm.batch_template = slurm_template(slots)
        return "slurm"
    raise MpbookError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")


def slurm_template(slots: Sequence[HostSlots]) -> str:
    """ipyparallel's Slurm engine script, with the hosts and the engines per host: ``srun``
    starts one engine per task, ``--nodelist`` holds the job to the hosts named."""
    per_node = {slot.n for slot in slots}
    lines = [
        "#!/bin/sh",
        "#SBATCH --export=ALL",
        "#SBATCH --job-name=ipengine-{cluster_id}",
        f"#SBATCH --nodelist={','.join(slot.name for slot in slots)}",
        f"#SBATCH --nodes={len(slots)}",
        "#SBATCH --ntasks={n}",
    ]
    if len(per_node) == 1:
        lines.append(f"#SBATCH --ntasks-per-node={per_node.pop()}")
    return "\n".join([*lines, "srun {program_and_args}", ""])


class Multiplex:
    """One SSH connection per host, shared by the launcher's many ssh and scp calls
    (``ControlMaster``): each call then skips the key exchange. The masters run in the
    background until :meth:`close` (or ``ControlPersist`` seconds idle); their sockets are
    in a folder private to this user."""

    PERSIST_S = 120

    def __init__(self):
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="mpbook-ssh-")

    @property
    def options(self) -> list[str]:
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.folder}/%C",
                "-o", f"ControlPersist={self.PERSIST_S}"]

    def close(self, hosts: Sequence[str]) -> None:
        """End the master connection to each of ``hosts`` and remove the folder."""
        import shutil
        import subprocess

        for host in hosts:
            try:
                subprocess.run(["ssh", *SSH_OPTIONS, *self.options, "-O", "exit", host],
                               capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def remote_files(engine_sets) -> dict[str, list[str]]:
    """What ipyparallel's SSH launchers left on each host (location -> paths): each engine's
    output file and the connection files sent there. Read before the engines stop (a
    stopped launcher is forgotten)."""
    from ipyparallel.cluster.launcher import SSHLauncher

    found: dict[str, list[str]] = {}
    for engine_set in engine_sets:
        for launcher in getattr(engine_set, "launchers", {}).values():
            if isinstance(launcher, SSHLauncher) and launcher.location:
                paths = found.setdefault(launcher.location, [])
                for path in [launcher.remote_output_file, *launcher.remote_connection_files.values()]:
                    if path and path not in paths:
                        paths.append(path)
    return found


def remove_remote_files(files: dict[str, list[str]], options: Sequence[str] = ()) -> None:
    """Remove ``files`` (location -> paths) on their hosts, one ssh call per host."""
    import shlex
    import subprocess

    for location, paths in files.items():
        if not paths:
            continue
        try:
            subprocess.run(["ssh", *SSH_OPTIONS, *options, location, "rm -f " + " ".join(shlex.quote(p) for p in paths)],
                           capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
