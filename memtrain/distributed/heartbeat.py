"""Rank 0's heartbeat, so that the other ranks exit when it dies instead of hanging.

A worker of a distributed run mostly waits: for the next remote call (rpc) or the next
command (pipeline). If rank 0 dies, nothing wakes it up — torchrun's agent kills the
local siblings of a dead process, but ranks on other nodes would wait for the network
time-outs (30 minutes for gloo). So rank 0 bumps a counter in the job's key-value store
every ``interval`` seconds, and every other rank watches it: if the counter has not
changed for ``timeout`` seconds, or the store itself is gone (it lives with rank 0's
agent), the rank prints one line and exits with code 1. Exit takes at most
``timeout + interval`` seconds after rank 0's last beat.

A rank that waits inside a collective or an RPC usually hears of rank 0's death sooner,
as an exception from gloo or TensorPipe (with a C++ stack in its message). Such a rank
runs its waiting under :meth:`Heartbeat.verdict`: the exception is held until the
heartbeat decides — rank 0 silent: the one line and exit code 1, no traceback; rank 0
still beating or finished: the exception goes on as it was.

:meth:`Heartbeat.stop` and :meth:`Heartbeat.finish` wait for the threads to end. A thread
still inside a store call (a C++ call that releases the GIL) when the interpreter
finalizes aborts the whole process as it returns: "terminate called without an active
exception", exit -6, after a run that had succeeded. Python 3.11 ends such a thread with
``pthread_exit``, and its unwinding through pybind11's GIL guard calls ``std::terminate``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

KEY = "heartbeat"
DONE = "done"
EXIT_MASTER_LOST = 1
JOIN_TIMEOUT = 10.0  # s: a store call that hangs longer (its host unreachable) is left running


class Heartbeat:
    """``beat`` on rank 0, ``watch`` elsewhere; a daemon thread either way. ``stop()`` ends it."""

    def __init__(self, store, *, rank: int, timeout: float, interval: float = 2.0, label: str = "") -> None:
        self.store = store
        self.rank = rank
        self.timeout = timeout
        self.interval = min(interval, timeout / 4)
        self.label = label or f"rank {rank}"
        self._stop = threading.Event()
        self._last_change = time.monotonic()
        self._threads: list[threading.Thread] = []

    def start(self) -> Heartbeat:
        if self.rank == 0:
            self._spawn(self._beat)
        else:
            self._spawn(self._poll)
            self._spawn(self._watch)
        return self

    def stop(self) -> None:
        """End the threads and wait for them (at most ``JOIN_TIMEOUT`` s; see the module)."""
        self._stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def finish(self) -> None:
        """At a normal end: :meth:`stop`; rank 0 then tells the watchers to stop watching (it may exit before they do).

        The beats have stopped before ``done`` is written, so no late beat overwrites it."""
        self.stop()
        if self.rank == 0:
            try:
                self.store.set(KEY, DONE)
            except Exception:
                pass

    @contextlib.contextmanager
    def verdict(self):
        """Around a follower's waiting: an exception inside waits for the heartbeat's verdict on rank 0 (see the module)."""
        try:
            yield
        except Exception:
            deadline = time.monotonic() + self.timeout + 2 * self.interval
            while time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(min(0.2, self.interval))  # _watch exits the process here if rank 0 is gone
            raise

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target) -> None:
        t = threading.Thread(target=target, name=f"memtrain-heartbeat-{target.__name__.strip('_')}", daemon=True)
        t.start()
        self._threads.append(t)

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.store.set(KEY, str(n))
            except Exception:  # the store went away: the job is ending anyway
                return
            self._stop.wait(self.interval)

    def _poll(self) -> None:
        # Reads may block if the network hangs; _watch decides independently of them.
        seen = None
        while not self._stop.is_set():
            try:
                if self.store.check([KEY]):
                    value = self.store.get(KEY)
                    if value == DONE.encode():
                        self._stop.set()
                        return
                    if value != seen:
                        seen = value
                        self._last_change = time.monotonic()
            except Exception:
                pass  # store unreachable: no news, the watch times out
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            silent = time.monotonic() - self._last_change
            if silent > self.timeout:
                print(f"memtrain: error: {self.label}: no heartbeat from rank 0 for {silent:.0f} s (it died or hangs); exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_MASTER_LOST)
