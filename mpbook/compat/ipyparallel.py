"""What mpbook needs from ipyparallel beyond its documented API (checked against 9.2).

- per-target output and published data: ``AsyncResult.metadata`` (public; a dict for a
  single target, a list otherwise);
- waiting for some targets only (the survivors after an engine died): ``AsyncResult.split()``
  (public since 8.0), whose parts are futures for ``concurrent.futures.wait``;
- a hook into an engine's stop on SIGTERM, to exit cleanly: the engine application's
  ``init_signal`` (not underscored, but not documented either), wrapped, not replaced.

mpbook prints each rank's output itself (``[rank N]`` labels) rather than through
``AsyncResult.stream_output``, which labels by engine id: on an attached cluster the ids are
not the ranks.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

CHECKED = "9.2"


def target_metadata(result) -> list[dict[str, Any]]:
    """One metadata dict per target of ``result`` (stdout, stderr, data ...), never blocking."""
    metadata = result.metadata
    return [metadata] if isinstance(metadata, dict) else list(metadata)


def wait_for_targets(result, positions: Sequence[int], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the targets at ``positions`` of ``result``; True if done."""
    parts = result.split()
    if len(parts) <= max(positions, default=-1):
        return result.wait(timeout_s)
    done, pending = concurrent.futures.wait([parts[i] for i in positions], timeout=timeout_s)
    return not pending


def engine_class():
    """ipyparallel's engine application, recording whether a stop was asked for (SIGTERM)."""
    import signal

    from ipyparallel.engine.app import IPEngine

    class Engine(IPEngine):
        stopping = False

        def init_signal(self):
            super().init_signal()
            stop = signal.getsignal(signal.SIGTERM)

            def on_sigterm(sig, frame):
                Engine.stopping = True
                if callable(stop):
                    stop(sig, frame)

            signal.signal(signal.SIGTERM, on_sigterm)

    return Engine


def ssh_engine_set_launcher():
    """ipyparallel's SSH engine launcher, with its remote calls made faster by ipyparallel's
    own means: its shell-command sender in the mode that sends the receiving code along
    (``send_receiver_code=True``, stdlib only on the far side) instead of importing
    ipyparallel there for every call, a second or more each; and its wait for a remote pid
    sent as ipyparallel's own ``ssh_waitpid`` source, for the same reason."""
    import inspect

    from ipyparallel.cluster import launcher as launchers
    from ipyparallel.cluster.shellcmd import ShellCommandSend

    class SSHEngineLauncher(launchers.SSHEngineLauncher):
        @property
        def ssh_sender(self):
            if self._ssh_sender is None:
                self._ssh_sender = ShellCommandSend(self.ssh_cmd, self.ssh_args + [self.location], self.remote_python,
                                                    log=self.log, send_receiver_code=True)
            return self._ssh_sender

        def wait_one(self, timeout):
            code = f"import psutil\n{inspect.getsource(launchers.ssh_waitpid)}\nssh_waitpid({self.pid}, timeout={timeout})\n"
            values = launchers._ssh_outputs(self.ssh_sender.check_output_python_code(code))
            if "process_running" not in values:
                raise RuntimeError(f"waiting for pid {self.pid} on {self.location}: {values}")
            if int(values.get("process_running", 0)):
                raise TimeoutError("still running")
            return int(values.get("exit_code", -1))

    class SSHEngineSetLauncher(launchers.SSHEngineSetLauncher):
        launcher_class = SSHEngineLauncher

    return SSHEngineSetLauncher


def controller_ports() -> set[int]:
    """In an engine: the ports of the controller's channels it connects to, from the
    connection info ipyparallel's engine application keeps (``connection_info``: a port, or
    a list of ports, per channel); empty outside an engine."""
    from ipyparallel.engine.app import IPEngine

    if not IPEngine.initialized():
        return set()
    info = getattr(IPEngine.instance(), "connection_info", None) or {}
    ports = set()
    for value in info.values():
        for port in value if isinstance(value, list) else [value]:
            if isinstance(port, int) and not isinstance(port, bool):
                ports.add(port)
    return ports


def verify() -> None:
    """Raise with a clear message if this ipyparallel lacks what the adapter uses."""
    import inspect

    import ipyparallel
    from ipyparallel.client.asyncresult import AsyncResult
    from ipyparallel.engine.app import IPEngine

    problems = []
    if not isinstance(inspect.getattr_static(AsyncResult, "metadata", None), property):
        problems.append("AsyncResult.metadata is no longer a property")
    if not callable(getattr(AsyncResult, "split", None)):
        problems.append("AsyncResult.split() is gone")
    if not issubclass(AsyncResult, concurrent.futures.Future):
        problems.append("an AsyncResult is no longer a concurrent.futures.Future")
    init_signal = getattr(IPEngine, "init_signal", None)
    if not callable(init_signal):
        problems.append("IPEngine.init_signal (where the engine installs its SIGTERM handler) is gone")
    elif "SIGTERM" not in inspect.getsource(init_signal):
        problems.append("IPEngine.init_signal no longer installs the SIGTERM handler")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.ipyparallel was checked against ipyparallel {CHECKED}; "
            f"ipyparallel {ipyparallel.__version__} differs: {'; '.join(problems)}"
        )
