"""Real stores on 127.0.0.1 for the remote-shard tests, started and stopped by fixtures: moto's S3
server (a separate process; the AWS_* variables point every client at it), a static HTTP server that
answers Range requests (RangeHTTPServer, a separate process) and a fault-injecting HTTP proxy in front
of it (threads of this process)."""
from __future__ import annotations

import http.client
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Credentials the S3 clients sign with (moto accepts any): distinctive, so that a test can search every
# log and MLflow record of a run for them.
AWS_KEY_ID = "AKIAFOUNDRYTESTKEY01"
AWS_SECRET = "foundry-test-secret-3b9e0c1d7a4f2e6b8c5d"
SERVER_START_S = 60  # a server not answering after this long fails the fixture (not a speed limit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], url: str, cwd: Path | None = None) -> subprocess.Popen:
    """Starts a server process and waits until ``url`` answers."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{' '.join(command)} did not start (exit {proc.poll()})") from None
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, and the AWS_* environment (this process and its children) aimed at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
                            "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            stop_server(server)


def make_bucket(name: str):
    """A new bucket in the S3 server of ``s3_endpoint``; returns its s3fs file system."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return fs


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """(folder, URL): a static HTTP server with Range support (RangeHTTPServer) serving the folder."""
    root = tmp_path_factory.mktemp("http_root")
    port = free_port()
    server = start_server([sys.executable, "-m", "RangeHTTPServer", str(port), "--bind", "127.0.0.1"],
                          f"http://127.0.0.1:{port}/", cwd=root)
    try:
        yield root, f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the server at ``upstream`` (host:port) that injects faults
    into requests for the files named in ``plan``: each planned fault is used by one request, in order.
    Faults: 404 or 403 (that status instead of the file), ("reset", n) (the response cut after n body
    bytes by a TCP reset), ("stall", s) (nothing sent for s seconds, then the response). ``requests``
    logs (method, path, Range header) of every request."""

    upstream: str
    plan: dict[str, list] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, name: str, *faults) -> None:
        with self.lock:
            self.plan[name] = list(faults)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, method: str, path: str, byte_range: str | None):
        with self.lock:
            self.requests.append((method, path, byte_range))
            planned = self.plan.get(path.rsplit("/", 1)[-1])
            return planned.pop(0) if planned else None

    def forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        byte_range = handler.headers.get("Range")
        fault = self._next_fault(method, handler.path, byte_range)
        if fault in (403, 404):
            handler.send_error(fault)
            return
        kind, amount = fault if isinstance(fault, tuple) else (None, 0)
        if kind == "stall":
            time.sleep(amount)
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        upstream.request(method, handler.path, headers={"Range": byte_range} if byte_range else {})
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        handler.send_response(response.status)
        for name in ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "Last-Modified"):
            if response.getheader(name):
                handler.send_header(name, response.getheader(name))
        handler.end_headers()
        if method == "HEAD":
            return
        if kind == "reset":
            handler.wfile.write(body[:amount])
            # SO_LINGER 0: closing sends RST instead of FIN, as a dropped connection does
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return
        handler.wfile.write(body)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # writes to a socket the proxy reset on purpose


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.proxy.forward(self, "GET")

    def do_HEAD(self) -> None:
        self.server.proxy.forward(self, "HEAD")

    def log_message(self, *args) -> None:
        pass
