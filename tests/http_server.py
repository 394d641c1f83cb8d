"""A loopback HTTP file server for tests: no network beyond 127.0.0.1.

`FileServer` serves bytes from a dict (URL path -> bytes) on an ephemeral
port of 127.0.0.1, in a daemon thread, answers `Range: bytes=N-` with 206,
records every request, and can be told to misbehave per path:

    server.files["/a.tar.gz"] = data
    server.faults["/a.tar.gz"] = Fault(fail=2)          # 500 twice, then serve
    server.faults["/b.bin"] = Fault(truncate=100)       # announce all, send 100 bytes, close
    server.faults["/c.bin"] = Fault(truncate=100, times=1)  # only the first reply is cut
    server.faults["/d.bin"] = Fault(status=404)
    server.faults["/e.bin"] = Fault(ignore_range=True)  # answer Range requests with 200

Use it as a context manager; leaving it shuts the server down and joins the thread.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    fail: int = 0  # answer the first `fail` requests with 500
    status: int | None = None  # answer every request with this status (e.g. 404)
    truncate: int | None = None  # send at most this many body bytes, then close
    times: int | None = None  # truncate only the first `times` replies (None: all)
    ignore_range: bool = False


@dataclass
class Request:
    method: str
    path: str
    range: str | None


class FileServer:
    def __init__(self, timeout: float = 5.0):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[Request] = []
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._timeout = timeout
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> FileServer:
        handler = type("Handler", (_Handler,), {"owner": self, "timeout": self._timeout})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout)
        self._httpd = self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _note(self, method: str, path: str, range_header: str | None) -> int:
        with self._lock:
            self.requests.append(Request(method, path, range_header))
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]


class _Handler(BaseHTTPRequestHandler):
    owner: FileServer
    protocol_version = "HTTP/1.0"  # one request per connection: a cut reply is a closed socket

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.owner
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        count = owner._note(self.command, path, range_header)
        fault = owner.faults.get(path, Fault())
        if fault.status is not None:
            return self._plain(fault.status, body)
        if count <= fault.fail:
            return self._plain(500, body)
        data = owner.files.get(path)
        if data is None:
            return self._plain(404, body)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not fault.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        payload = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        cut = fault.truncate is not None and (fault.times is None or count <= fault.times)
        if cut:
            payload = payload[: fault.truncate]
            self.close_connection = True
        self.wfile.write(payload)
        self.wfile.flush()

    def _plain(self, status: int, body: bool) -> None:
        text = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)
