"""Engine side of the dashboard: publish telemetry snapshots while a task runs.

Code in a ``%%mp run`` cell never calls anything, so a background thread does the
publishing: it wakes every ``period_s`` while a task runs and sends
``telemetry.snapshot()`` through ipyparallel's DataPub, where the client merges it into the
running task's ``AsyncResult.data``. Between tasks the thread sleeps and sends nothing.

Why this is safe from a thread (ipykernel 7, ipyparallel 9):

- The engine's IOPub socket is ipykernel's ``IOPubThread``: ``send_multipart`` from any
  thread queues the send for the IOPub thread through a per-thread event pipe, so threads
  never share a zmq socket.
- ``publish_data`` stamps each message with DataPub's ``parent_header``, which the kernel
  sets (on the main thread) to the request it is handling. The client files a data message
  under its parent's msg_id, so the header must be the running task's. It is for as long as
  the task runs, because the kernel handles one request at a time; :meth:`Publisher.end`
  takes the same lock as the thread, so no snapshot leaves after the task ends (which
  could be filed under the next request).

Tasks are bracketed in two places: ``execute`` requests (``%%mp run``) by the shell's
``pre_execute``/``post_execute`` events, ``apply`` requests by :func:`mpbook.engine.group.call`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..protocol import TELEMETRY_LATEST, TELEMETRY_START

PERIOD_S = 0.25  # four snapshots a second: the dashboard promises at least two

log = logging.getLogger("mpbook.publish")


def send(key: str, snapshot: dict[str, Any]) -> None:
    """Publish one snapshot under the request the engine is handling now.

    The client's ``md['data'].update()`` replaces a key whole: ``telemetry`` always holds the
    latest snapshot, ``telemetry_start`` the one taken as the task began (the baseline of the
    task's own rates, kept even when the task is over before the client looks).
    """
    from ipyparallel.datapub import publish_data

    publish_data({key: snapshot})


class Publisher:
    """One per engine: a sleeping thread that publishes snapshots while a task runs."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        *,
        period_s: float = PERIOD_S,
        send: Callable[[str, dict[str, Any]], None] = send,
        on_begin: Callable[[], None] | None = None,
    ):
        self.snapshot = snapshot
        # Called as each task begins, before its first snapshot (the memory peak starts afresh,
        # so that the peak a task's snapshots show is that task's own).
        self.on_begin = on_begin
        self.period_s = period_s
        self.enabled = True  # off: tasks run without publishing (for the overhead benchmark)
        self.published = 0  # snapshots sent, for tests and the benchmark
        self._send = send
        self._cond = threading.Condition()
        self._depth = 0  # nested begin/end (an apply inside a cell) count as one task
        self._closed = False
        self._failed = False
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- tasks
    def begin(self, *_: Any) -> None:
        """A task starts (``*_``: IPython's event arguments, unused)."""
        with self._cond:
            self._depth += 1
            if self._depth > 1 or self._closed:
                return
            self._begun()
            if not self.enabled:
                return
            if self._thread is None:
                # A daemon: an engine that exits never waits for it. Started on first use
                # and kept, so its IOPub event pipe is made once.
                self._thread = threading.Thread(target=self._loop, name="mpbook-publisher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            self._publish(TELEMETRY_START)

    def end(self, *_: Any) -> None:
        """The task ends: one last snapshot, so the client sees the final totals."""
        with self._cond:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth == 0:
                self._cond.notify_all()
                if self.enabled and not self._closed:
                    self._publish()

    def _begun(self) -> None:
        if self.on_begin is None:
            return
        try:
            self.on_begin()
        except Exception:  # like a failing snapshot: never the task's problem
            log.warning("mpbook could not start a task's telemetry", exc_info=True)

    @contextmanager
    def task(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def close(self) -> None:
        """Stop the thread for good (the engine leaves mpbook)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    # ----------------------------------------------------------------- thread
    def _active(self) -> bool:
        return self._depth > 0 and self.enabled and not self._closed

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._active():
                    self._cond.wait()
                    continue
                # Sleep one period, waking early when the task ends; the lock is released
                # while waiting, so begin/end never wait on the thread's sleep.
                self._cond.wait(self.period_s)
                if self._active():
                    self._publish()

    def _publish(self, key: str = TELEMETRY_LATEST) -> None:
        # Called with the lock held. A failing snapshot must never hurt the task: log it once.
        try:
            self._send(key, self.snapshot())
            self.published += 1
        except Exception:
            if not self._failed:
                self._failed = True
                log.warning("mpbook could not publish a telemetry snapshot", exc_info=True)


def install(state) -> Publisher:
    """Give the engine a publisher and bracket every executed cell with it."""
    from IPython import get_ipython

    publisher = Publisher(lambda: state.telemetry.snapshot(), on_begin=lambda: state.telemetry.reset_peak())
    events = get_ipython().events
    events.register("pre_execute", publisher.begin)
    events.register("post_execute", publisher.end)
    return publisher


def uninstall(publisher: Publisher | None) -> None:
    if publisher is None:
        return
    from IPython import get_ipython

    events = get_ipython().events
    for name, callback in (("pre_execute", publisher.begin), ("post_execute", publisher.end)):
        try:
            events.unregister(name, callback)
        except ValueError:  # already gone
            pass
    publisher.close()
