"""The agent's conversation with systemd: READY, STATUS, WATCHDOG and STOPPING over NOTIFY_SOCKET.

A dozen lines of standard library instead of a dependency. Outside systemd
(NOTIFY_SOCKET unset) every call is a no-op, so the agent runs the same way in
a terminal, in tests and as a service.

The watchdog is fed from the agent's main loop, never from a helper thread: if
the loop wedges, the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self.watchdog_interval_s = self._watchdog_interval(env)
        self._last_ping = 0.0

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends; None when no watchdog is armed."""
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, **fields: object) -> bool:
        """Send KEY=VALUE lines (READY=1, STATUS=...); False when not under systemd or on failure."""
        if not self._addr:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._addr)
            return True
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self, status: str = "stopping") -> None:
        self.notify(STOPPING=1, STATUS=status)

    def watchdog_due(self) -> bool:
        return self.watchdog_interval_s is not None and time.monotonic() - self._last_ping >= self.watchdog_interval_s

    def feed_watchdog(self) -> None:
        """Ping if half the watchdog period has passed since the last ping."""
        if self.watchdog_due():
            self.notify(WATCHDOG=1)
            self._last_ping = time.monotonic()
