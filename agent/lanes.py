"""Work that must run in arrival order, on the shared inference pool.

A stateful model's MQTT messages carry chunks of streams (a microphone's frames): run on
a pool of several threads, two chunks that arrived in order could run out of order and
feed the stream's state backwards. Work submitted under one key runs one at a time, in
the order it was submitted; work under other keys, or under None, runs alongside it.
A lane holds no thread while it is empty.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Hashable

log = logging.getLogger(__name__)


class Lanes:
    def __init__(self, submit: Callable[[Callable[[], None]], object]):
        self._submit = submit  # e.g. ThreadPoolExecutor.submit
        self._queues: dict[Hashable, deque] = {}
        self._lock = threading.Lock()

    def run(self, key: Hashable | None, work: Callable[[], None]) -> None:
        """Run `work` on the pool: at once for key None, else after the key's earlier work.
        Raises what the pool's submit raises (RuntimeError once it is shut down)."""
        if key is None:
            self._submit(work)
            return
        with self._lock:
            queue = self._queues.get(key)
            if queue is not None:  # the lane's thread runs it after the work before it
                queue.append(work)
                return
            self._queues[key] = deque([work])
        try:
            self._submit(lambda: self._drain(key))
        except BaseException:
            with self._lock:
                self._queues.pop(key, None)
            raise

    def _drain(self, key: Hashable) -> None:
        while True:
            with self._lock:
                queue = self._queues[key]
                if not queue:
                    del self._queues[key]
                    return
                work = queue.popleft()
            try:
                work()
            except Exception:  # one item's bug must not strand the items behind it
                log.exception("ordered work for %r failed", key)
