"""One memory budget for the whole server: work reserves what its activations will hold before it runs.

cost.batch_within bounds one call's batch; nothing bounded them together: six heavy links at once were
OOM-killed at 12.7 GB in a 12 GB server, and one model page of a 1024 x 1024 model took 9 GB. Every job and
every batched prediction now takes its bytes from one budget (CNN_AUDIT_MAX_SERVER_BYTES, and at most 40% of
the memory this process may use), in the order they asked: a job waits in line, saying its place, and a quick
view that cannot be served within a minute says the server is busy. Work already holding a reservation (a
job's own predictions) does not reserve again: it cannot wait for itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections import deque
from pathlib import Path

from audit import limits
from audit.errors import ServerBusyError

SHARE_OF_MEMORY = 0.4
"""At most this share of the memory the process may use (its cgroup's limit, or the machine's) is reserved:
the rest holds the loaded models (CNN_AUDIT_MAX_LOADED_MODEL_BYTES), TensorFlow's own buffers and the pages."""

_HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("admission_held", default=False)


def usable_memory() -> int:
    """Bytes this process may use: the cgroup's memory limit when one is set (a container), else the machine's."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(machine, int(text))
    return machine


def server_bytes() -> int:
    """The budget: CNN_AUDIT_MAX_SERVER_BYTES, at most SHARE_OF_MEMORY of usable_memory()."""
    return int(min(limits.SERVER_BYTES.value, SHARE_OF_MEMORY * usable_memory()))


class Budget:
    """Bytes handed out first come, first served, up to a total."""

    def __init__(self, total=server_bytes):
        self._total = total
        self._changed = threading.Condition()
        self._taken = 0
        self._line: deque = deque()

    @property
    def total(self) -> int:
        return int(self._total() if callable(self._total) else self._total)

    @property
    def taken(self) -> int:
        with self._changed:
            return self._taken

    @contextlib.contextmanager
    def reserve(self, nbytes: float, waiting=None, timeout: float | None = None):
        """Hold `nbytes` (at most the whole budget) while the block runs. While others hold too much, wait in
        line: `waiting(place)` is called every half second (place 0: next; it may raise to give up, as Cancel
        does), and after `timeout` seconds ServerBusyError is raised."""
        if _HELD.get():  # inside a reservation already (a job's own calls): covered by it
            yield
            return
        wanted = int(min(max(nbytes, 0), self.total))
        ticket, start = object(), time.monotonic()
        with self._changed:
            self._line.append(ticket)
        try:
            while True:
                with self._changed:
                    if self._line[0] is ticket and self._taken + wanted <= self.total:
                        self._line.popleft()
                        self._taken += wanted
                        self._changed.notify_all()
                        break
                    self._changed.wait(0.5)
                    place = self._line.index(ticket)
                if timeout is not None and time.monotonic() - start > timeout:
                    raise ServerBusyError(
                        f"The server is busy: other sessions' work holds {self.taken / 2**30:.1f} of its "
                        f"{self.total / 2**30:.1f} GB for activations (CNN_AUDIT_MAX_SERVER_BYTES). Try again in "
                        "a minute.")
                if waiting is not None:
                    waiting(place)
        except BaseException:
            with self._changed:
                if ticket in self._line:
                    self._line.remove(ticket)
                self._changed.notify_all()
            raise
        token = _HELD.set(True)
        try:
            yield
        finally:
            _HELD.reset(token)
            with self._changed:
                self._taken -= wanted
                self._changed.notify_all()


SERVER = Budget()
"""The budget every session of this process shares."""
