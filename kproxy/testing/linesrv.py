"""A long-lived line server and its client, for tests that hold connections open (graceful
termination) or need SCTP, which `EchoServer` does not speak.

On each connection the server sends a JSON greeting line ``{"name", "peer"}``, then one such line
for every line received, until the peer closes or `shutdown_all()` half-closes every connection
(the server's FIN: what lets IPVS count a connection as ended after its FIN_WAIT timer).
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading

from kproxy.testing.netns import socket_in


class LineServer:
    """On each connection: a JSON greeting line {"name", "peer"}, then one such line for every line
    received, until the peer closes or `shutdown_all()` half-closes every connection (FIN)."""

    def __init__(self, ns: str, name: str, port: int, proto: int = socket.IPPROTO_TCP) -> None:
        self.name = name
        self.conns: list[socket.socket] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, proto)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("0.0.0.0", port))
        self._listener.listen(64)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _line(self, peer: str) -> bytes:
        return (json.dumps({"name": self.name, "peer": peer}) + "\n").encode()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while all(key.fileobj is self._listener for key, _ in sel.select()):
                try:
                    conn, (peer, *_) = self._listener.accept()
                except OSError as e:
                    self.errors.append(repr(e))
                    continue
                with self._lock:
                    self.conns.append(conn)
                threading.Thread(target=self._talk, args=(conn, peer), daemon=True).start()

    def _talk(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.sendall(self._line(peer))
            buf = b""
            while chunk := conn.recv(4096):
                buf += chunk
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    conn.sendall(self._line(peer))
        except OSError:
            pass  # the peer reset or we shut down: either ends the conversation

    def shutdown_all(self) -> None:
        with self._lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for c in self.conns:
                c.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()


def line_client(ns: str, dst: str, port: int, proto: int = socket.IPPROTO_TCP) -> tuple[socket.socket, dict[str, str]]:
    """Connect from `ns` and read the greeting: (socket, greeting)."""
    sock = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, proto)
    sock.settimeout(5)
    sock.connect((dst, port))
    return sock, read_line(sock)


def read_line(sock: socket.socket) -> dict[str, str]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    greeting: dict[str, str] = json.loads(data)
    return greeting
