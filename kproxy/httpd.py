"""Small HTTP servers for /healthz, /livez, /metrics and the health-check node ports.

Guarantees:
- `listen` binds before it returns, so a caller learns at once that an address is taken.
- An unspecified host (``0.0.0.0`` or ``::``) listens on every address of both families when the
  kernel has IPv6, as Go's ``net.Listen`` does for kube-proxy; a literal IP listens on that only.
- Each server has one accept thread and a thread per connection; one request per connection
  (HTTP/1.0 semantics). `stop` closes the listening socket, cuts every open connection and joins
  every thread it started, so a silent or slow client never delays shutdown.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from kproxy.config import split_host_port

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class WithQuery:
    """A route that reads the request's query string (``?service=ns/name``), parsed as
    `urllib.parse.parse_qs` does: each key with the list of its values."""

    answer: Callable[[Mapping[str, list[str]]], Response]


# What one path answers; a path without a route answers 404 unless there is an ANY_PATH route.
Route = Callable[[], Response] | WithQuery
ANY_PATH = "*"
REQUEST_TIMEOUT = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    routes: dict[str, Route]

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, dual_stack: bool) -> None:
        self.address_family = family
        self._dual_stack = dual_stack
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self._dual_stack else 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        routes = self.server.routes
        path, _, query = self.path.partition("?")
        route = routes.get(path) or routes.get(ANY_PATH)
        if route is None:
            answer = Response(404, TEXT, b"404 page not found\n")
        elif isinstance(route, WithQuery):
            answer = route.answer(parse_qs(query))
        else:
            answer = route()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes every few seconds would drown the one-line-per-sync log


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


class HTTPServer:
    """One listening socket serving a fixed set of routes."""

    def __init__(self, address: str, routes: dict[str, Route]) -> None:
        host, given_port = split_host_port(address)
        port = given_port or 0
        self.requested = address
        if host in ("0.0.0.0", "::") and _ipv6_available():
            self._server = _Server(("::", port), socket.AF_INET6, dual_stack=True)
        elif ":" in host:
            self._server = _Server((host, port), socket.AF_INET6, dual_stack=False)
        else:
            self._server = _Server((host, port), socket.AF_INET, dual_stack=False)
        self._server.routes = routes
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"http:{address}",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()  # joins the request threads (block_on_close)
        self._thread.join()


def listen(address: str, routes: dict[str, Route]) -> HTTPServer:
    """Serve `routes` on `address` (``IP:port``); OSError when it cannot be bound."""
    return HTTPServer(address, routes)
