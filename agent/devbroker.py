"""A private Mosquitto on a free loopback port, for the demo and the tests.

It never touches the system broker or its configuration: the config file, the
log and the port are its own, and it stops with the process that started it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import EdgewardError


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise EdgewardError("the mosquitto broker is not installed",
                            "install it: sudo apt-get install -y mosquitto")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    def __init__(self, port: int | None = None, workdir: str | os.PathLike | None = None, extra_conf: str = "",
                 listener_conf: str = "", anonymous: bool = True, tcp_nodelay: bool = True):
        """`listener_conf` goes right after the listener line (TLS files, require_certificate);
        `extra_conf` at the end (password_file, acl_file); `anonymous=False` requires a login."""
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgeward-broker-"))
        self.extra_conf = extra_conf
        self.listener_conf = listener_conf
        self.anonymous = anonymous
        self.tcp_nodelay = tcp_nodelay
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "LocalBroker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        # log to stderr, captured in a file we own: run as root, mosquitto drops to its own user
        # and could not open a log file in our folder
        conf.write_text(f"listener {self.port} 127.0.0.1\n{self.listener_conf}\n"
                        f"allow_anonymous {'true' if self.anonymous else 'false'}\npersistence false\n"
                        f"set_tcp_nodelay {'true' if self.tcp_nodelay else 'false'}\n"  # false: ~40 ms per round trip
                        f"log_dest stderr\n{self.extra_conf}\n")
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text()[-500:] if log.exists() else ""
                raise EdgewardError(f"mosquitto exited at start (code {self.proc.returncode}): {tail.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EdgewardError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
