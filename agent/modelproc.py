"""The agent's handle on one model worker process (agent/worker.py).

One request at a time goes down the pipe; a reply that does not come within the
timeout, or a worker that dies, becomes an error for that request and marks the
process dead, so the engine can start a fresh one. Closing the handle ends the
process, which is what gives a model's memory back to the board.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading

from . import ipc
from .errors import WorkerCrashed, error_class
from .tensors import Tensor, from_frame, to_frame

log = logging.getLogger(__name__)

PIPE_BYTES = 1 << 20
_live: set[int] = set()  # pids of the workers this process started and has not ended
_live_lock = threading.Lock()


def live_pids() -> list[int]:
    """The model workers alive now (what the budget adds to the agent's own memory)."""
    with _live_lock:
        return list(_live)  # the Linux default limit for unprivileged pipe sizes (/proc/sys/fs/pipe-max-size)

def own_interpreter() -> str:
    """The binary to start child processes of the agent with: the agent's own interpreter.
    A locked-down service user may lack search permission on the directories its path runs
    through; /proc/self/exe reaches the running binary without them. Pass sys.executable as
    argv[0] beside it, which keeps the venv's path so the child finds the same packages."""
    exe = sys.executable
    if not os.access(exe, os.X_OK) and os.path.exists("/proc/self/exe"):
        exe = "/proc/self/exe"
    return exe


class ModelProcess:
    def __init__(self, start_timeout: float = 60.0):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # the runtime's own thread setting governs
        # glibc gives each thread that allocates its own heap (up to 8 per core); a batched
        # worker's connection threads each keep freed request buffers in theirs. Two heaps:
        # 12 MB less for a batched CNN's worker under 32 clients, ~3 % less throughput.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        self._proc = subprocess.Popen([sys.executable, "-m", "agent.worker"], executable=own_interpreter(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self._proc.pid
        with _live_lock:
            _live.add(self.pid)
        self._out = self._proc.stdin.fileno()
        self._in = self._proc.stdout.fileno()
        for fd in (self._out, self._in):  # an image crosses in one write instead of 64 kB at a time
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except (OSError, AttributeError):
                pass
        self._reader = ipc.reader_for(self._in)
        self._lock = threading.Lock()
        self.dead = False
        hello, _ = self._receive(start_timeout, "starting")
        self.base_rss_mb = float(hello.get("rss_mb", 0.0))
        self.rss_mb = self.base_rss_mb  # updated by the engine after the model loads
        self.direct_path: str | None = None  # the worker's own socket for local apps, if it has one
        self.providers: list[str] | None = None  # the execution providers its runtime runs on (onnxruntime)
        self.detections: list[str] = []  # a detector's boxes, classes, scores and count outputs, as it read them

    # ---------------------------------------------------------------- requests

    def call(self, header: dict, tensors: list[Tensor] = (), timeout: float | None = None,
             what: str = "request") -> tuple[dict, list[Tensor]]:
        """Send one request; return the reply header and tensors, or raise the worker's error."""
        specs, body = to_frame(tensors)
        with self._lock:
            if self.dead:
                raise WorkerCrashed(f"the model's worker process is gone ({self.exit_reason()})")
            try:
                ipc.send(self._out, {**header, "tensors": specs}, body)
            except ipc.PipeClosed:
                self._died()
                raise WorkerCrashed(f"the model's worker process died ({self.exit_reason()})") from None
            reply, rbody = self._receive(timeout, what)
        if reply.get("status") != "ok":
            raise error_class(reply.get("code"))(reply.get("error", "worker error"), reply.get("fix"))
        return reply, from_frame(reply, rbody)

    def _receive(self, timeout: float | None, what: str) -> tuple[dict, memoryview]:
        if timeout is not None:
            ready, _, _ = select.select([self._in], [], [], timeout)
            if not ready:
                self.kill()
                raise WorkerCrashed(f"the model did not answer the {what} within {timeout:.0f} s; its worker was "
                                    "stopped", "check the model, or raise inference.timeout_s")
        try:
            return ipc.recv(self._reader)
        except (ipc.PipeClosed, ValueError):
            self._died()
            raise WorkerCrashed(f"the model's worker process died during the {what} ({self.exit_reason()})",
                                "the runtime crashed on this model or input; the agent starts a fresh worker") from None

    # ---------------------------------------------------------------- life

    def _died(self) -> None:
        self.dead = True
        self._forget()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._remove_socket()

    def exit_reason(self) -> str:
        rc = self._proc.poll()
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit status {rc}"

    def alive(self) -> bool:
        return not self.dead and self._proc.poll() is None

    def kill(self) -> None:
        self.dead = True
        self._forget()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._remove_socket()

    def _forget(self) -> None:
        with _live_lock:
            _live.discard(self.pid)

    def _remove_socket(self) -> None:
        if self.direct_path:
            try:
                os.unlink(self.direct_path)
            except OSError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """End the worker: close its pipe (it exits on EOF), kill it if it does not."""
        self.dead = True
        self._forget()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("model worker %d did not exit; killing it", self.pid)
            self._proc.kill()
            self._proc.wait()
        self._remove_socket()
