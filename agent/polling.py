"""Waiting: for something to become true, with a deadline and a message that says what never
happened; and briefly, awake, for a peer's next message."""

from __future__ import annotations

import select
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `predicate` until it returns something truthy and return it; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def linger(sock, seconds: float, step_s: float = 10e-6) -> bool:
    """Poll briefly for the peer's next message before sleeping in recv(); True if one came.
    `sock`: a socket, or the descriptor of a pipe (the agent and its workers).

    A peer that answers (or sends its next request) quickly finds this thread and its CPU
    core awake instead of paying a wake-up each time; on this kind of hardware that is most
    of the per-request overhead. Costs at most `seconds` of CPU. The socket is polled every
    `step_s`, not back to back: a poll per microsecond slowed the peer's own work on the
    other core, and poll() (not a non-blocking recv, which Python makes wait on a socket
    with a timeout) lets the process's other threads run between checks."""
    if seconds <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    clock = time.perf_counter
    end = clock() + seconds
    while True:
        if poller.poll(0):
            return True  # data, or the peer closed: recv() will say which
        now = clock()
        if now >= end:
            return False
        while clock() - now < step_s:
            pass
