"""Helpers for running a real nginx on loopback: echo backends, certificates, the nginx itself.

Everything binds 127.0.0.1 only. Readiness is polled with deadlines, never slept for. Teardown
stops nginx first (so keepalive connections to the backends close), then every backend server
and its handler threads, then removes the temporary prefix.
"""

from __future__ import annotations

import base64
import grp
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kproxy.ingress.nginx import NginxConfig
from kproxy.testing.certs import Cert, make_cert  # noqa: F401  (re-exported to the tests)

# The seed tables and Ingress builders live in tests/unit/test_ingress_routes.py; one copy of
# the rows serves both the pure tests and these real-nginx ones.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl")
HTPASSWD = shutil.which("htpasswd")
LOOPBACK = "127.0.0.1"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true or the deadline passes (short back-off between polls)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # poll interval; the deadline above is what bounds the wait
        delay = min(delay * 2, 0.1)


# --- echo backends ---------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keepalive, so nginx's upstream keepalive is exercised
    timeout = 10  # a handler blocked on an idle connection gives up on its own

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "backend": self.server.backend_name,  # type: ignore[attr-defined]
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_length": len(body),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _echo

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@dataclass
class Backend:
    name: str
    port: int
    server: ThreadingHTTPServer = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # joins the handler threads (block_on_close)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def start_backend(name: str, tls: ssl.SSLContext | None = None) -> Backend:
    server = ThreadingHTTPServer((LOOPBACK, 0), _EchoHandler)
    server.daemon_threads = False
    server.block_on_close = True
    server.backend_name = name  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=f"echo-{name}", kwargs={"poll_interval": 0.05})
    thread.start()
    return Backend(name, server.server_address[1], server, thread)


# --- certificates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_backends() -> Iterator[Callable[..., Backend]]:
    """Start named echo backends on loopback; all are stopped (threads joined) at teardown."""
    started: list[Backend] = []

    def start(name: str, tls: ssl.SSLContext | None = None) -> Backend:
        b = start_backend(name, tls)
        started.append(b)
        return b

    try:
        yield start
    finally:
        for b in started:
            b.stop()


@pytest.fixture(scope="session")
def cert_factory() -> Iterator[Callable[[str], Cert]]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    d = Path(tempfile.mkdtemp(prefix="kproxy-test-certs-"))
    try:
        yield lambda host: make_cert(d, host)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def htpasswd_secret() -> Callable[..., dict[str, Any]]:
    if HTPASSWD is None:
        pytest.skip("htpasswd is not installed")
    return _htpasswd_secret


def _htpasswd_secret(name: str, user: str, password: str, namespace: str = "default") -> dict[str, Any]:
    assert HTPASSWD is not None
    line = subprocess.run(
        [HTPASSWD, "-nbm", user, password], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return {
        "metadata": {"name": name, "namespace": namespace},
        "data": {"auth": base64.b64encode((line + "\n").encode()).decode()},
    }


# --- nginx -----------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def worker_user() -> tuple[str, str] | None:
    """As root, run workers as nobody:nogroup, as production would: it proves the file modes
    (htpasswd 0640 + group) work for an unprivileged worker."""
    if os.geteuid() != 0:
        return None
    try:
        grp.getgrnam("nogroup")
    except KeyError:
        return None
    return ("nobody", "nogroup")


@dataclass
class Nginx:
    prefix: Path
    http_port: int
    https_port: int
    proc: subprocess.Popen[bytes] | None = None
    config: NginxConfig | None = None

    def write(self, cfg: NginxConfig) -> None:
        user = worker_user()
        for p, spec in cfg.files:
            f = Path(p)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.parent.chmod(0o755)
            f.write_bytes(spec.content)
            f.chmod(spec.mode)
            if user is not None and p.endswith(".htpasswd"):
                # What the controller's writer must do: the worker's group reads the 0640 file.
                os.chown(f, 0, grp.getgrnam(user[1]).gr_gid)
        (self.prefix / "nginx.conf").write_text(cfg.text)
        self.config = cfg

    def argv(self, *extra: str) -> list[str]:
        return [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-e", "stderr", *extra]

    def check(self) -> None:
        r = subprocess.run(self.argv("-t", "-q"), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr

    def start(self) -> None:
        self.check()
        log = (self.prefix / "nginx.stderr").open("wb")
        self.proc = subprocess.Popen(self.argv("-g", "daemon off;"), stdout=log, stderr=log)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited:\n" + (self.prefix / "nginx.stderr").read_text())
            try:
                with socket.create_connection((LOOPBACK, self.http_port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(up, 10, "nginx to listen")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: workers exit, sockets close
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stderr(self) -> str:
        p = self.prefix / "nginx.stderr"
        return p.read_text() if p.exists() else ""


@pytest.fixture(scope="module")
def nginx_factory(
    echo_backends: Callable[..., Backend],
) -> Iterator[Callable[[Callable[..., NginxConfig]], Nginx]]:
    """Start nginx from `render(http_port, https_port, prefix, worker_user)`; retried on a port race.

    Depends on `echo_backends` so that pytest stops nginx before the backends."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed")
    started: list[Nginx] = []

    def start(render: Callable[..., NginxConfig]) -> Nginx:
        last: Exception | None = None
        for _ in range(3):
            prefix = Path(tempfile.mkdtemp(prefix="kproxy-nginx-"))
            prefix.chmod(0o755)  # workers (nobody) traverse it to reach htpasswd and temp files
            http_port, https_port = free_ports(2)
            n = Nginx(prefix, http_port, https_port)
            started.append(n)
            n.write(render(http_port, https_port, prefix, worker_user()))
            try:
                n.start()
                return n
            except RuntimeError as e:  # most likely someone took the port in between
                last = e
                n.stop()
        raise AssertionError(f"nginx did not start: {last}")

    try:
        yield start
    finally:
        for n in started:
            n.stop()
            shutil.rmtree(n.prefix, ignore_errors=True)


# --- HTTP client -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    peer_cert_subject: str = ""

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def backend(self) -> str:
        return self.json["backend"] if self.status == 200 else str(self.status)


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 while presenting `sni` as the server name (SNI and verification)."""

    def __init__(self, port: int, sni: str, context: ssl.SSLContext) -> None:
        super().__init__(sni, port, context=context, timeout=5)
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((LOOPBACK, self.port), timeout=5)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


@pytest.fixture(scope="session")
def client() -> Callable[..., Response]:
    """`request(port, host, path, method, headers, body, tls)` → `Response`."""
    return request


def request(
    port: int,
    host: str,
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    tls: ssl.SSLContext | None = None,
) -> Response:
    conn: http.client.HTTPConnection
    conn = _SNIConnection(port, host, tls) if tls is not None else http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        subject = ""
        if tls is not None and conn.sock is not None:
            cert = conn.sock.getpeercert()  # type: ignore[union-attr]
            subject = dict(x[0] for x in cert.get("subject", ()))["commonName"] if cert else ""
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, subject)
    finally:
        conn.close()
