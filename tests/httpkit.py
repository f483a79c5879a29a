"""A small real HTTP server for download tests: serves one blob, honours Range, and can misbehave on cue."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BlobServer:
    """Serves `data` at /bundle.ewb on 127.0.0.1. `drop_after` cuts the first N responses short
    after that many bytes; `ignore_range` answers every request with the whole file."""

    def __init__(self, data: bytes, drop_after: int | None = None, drops: int = 1, ignore_range: bool = False,
                 extra: bytes = b""):
        self.data, self.drop_after, self.drops_left, self.ignore_range, self.extra = data, drop_after, drops, ignore_range, extra
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path != "/bundle.ewb":
                    self.send_error(404, "no such file")
                    return
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                else:
                    self.send_response(200)
                body = server.data[start:] + server.extra
                cut = server.drop_after is not None and server.drops_left > 0
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut:
                    server.drops_left -= 1
                    self.wfile.write(body[:server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bundle.ewb"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "BlobServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CannedHttpServer:
    """Answers each connection on 127.0.0.1 with the next of `answers` (raw bytes, sent as they
    are: bad status lines, lying headers, cut bodies) and records each request's Range header."""

    def __init__(self, answers: list[bytes]):
        import socket

        self.answers, self.ranges = list(answers), []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/bundle.ewb"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(4096)
                    if not piece:
                        break
                    head += piece
                rng = [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"range:")]
                self.ranges.append(rng[0] if rng else None)
                conn.sendall(self.answers.pop(0) if self.answers else b"HTTP/1.1 503 Gone\r\nContent-Length: 0\r\n\r\n")

    def __enter__(self) -> "CannedHttpServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
