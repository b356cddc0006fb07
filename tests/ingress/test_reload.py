"""`Reloader` against a real nginx on 127.0.0.1: write on change, files and modes, nginx -t,
atomic swap, reload without dropping an in-flight request, a broken configuration kept out while
the old one keeps serving, one bad TLS Secret dropped without blocking the others."""

from __future__ import annotations

import base64
import grp
import http.client
import os
import shutil
import signal
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ingresskit import LOOPBACK, NGINX, Backend, Cert, free_ports, request, wait_until, worker_user
from test_ingress_routes import CLASS, P, ingress, path, rule, svc

from kproxy.backends.nginx import NginxProcess
from kproxy.ingress.convert import build_routes
from kproxy.ingress.metrics import IngressMetrics
from kproxy.ingress.model import IngressRef, RoutingTable
from kproxy.ingress.nginx import NginxConfig, NginxOptions, UpstreamMode, render
from kproxy.ingress.reload import Reloader
from kproxy.model import Endpoint

BROKEN_HOST = "broken.test"


def breaking_render(table: RoutingTable, options: NginxOptions, endpoints: Any = None) -> NginxConfig:
    """The real renderer, plus a directive nginx does not know inside the server of
    `BROKEN_HOST`: a stand-in for any configuration ``nginx -t`` refuses."""
    cfg = render(table, options, endpoints)
    marker = f'server_name "{BROKEN_HOST}";'
    if marker not in cfg.text:
        return cfg
    return replace(cfg, text=cfg.text.replace(marker, marker + "\n        no_such_directive on;"))


class Env:
    def __init__(self, state: Path, backends: dict[str, Backend], tls: Callable[[str], Cert]) -> None:
        self.state = state
        self.backends = backends
        self.cert = tls
        self.http_port, self.https_port = free_ports(2)
        self.options = NginxOptions(
            http_port=self.http_port,
            https_port=self.https_port,
            listen_addresses=(LOOPBACK,),
            cert_dir=str(state / "certs"),
            run_dir=str(state),
            upstream_mode=UpstreamMode.ENDPOINTS,
            user=worker_user(),
            worker_processes=1,
            worker_shutdown_timeout=30,
        )
        self.nginx = NginxProcess(
            NGINX, str(state), str(state / "nginx.conf"), str(state / "nginx.pid"), str(state / "nginx.log")
        )
        self.metrics = IngressMetrics()
        self.tests_run = 0
        real_test = self.nginx.test

        def counting_test(conf: str, timeout: float = 60) -> tuple[bool, str]:
            self.tests_run += 1
            return real_test(conf, timeout)

        self.nginx.test = counting_test  # type: ignore[method-assign]
        self.reloader = Reloader(
            self.nginx,
            self.options,
            conf_path=str(state / "nginx.conf"),
            metrics=self.metrics,
            reload_timeout=3.0,
            render_fn=breaking_render,
        )

    def table(self, *ings: dict[str, Any], secrets: list[dict[str, Any]] | None = None) -> RoutingTable:
        return build_routes(list(ings), [svc(n) for n in self.backends], secrets or [], [CLASS])

    def endpoints(self) -> dict[Any, list[Endpoint]]:
        return {svc(n).ports[0].name: [Endpoint(LOOPBACK, b.port)] for n, b in self.backends.items()}

    def apply(self, *ings: dict[str, Any], secrets: list[dict[str, Any]] | None = None) -> Any:
        return self.reloader.apply(self.table(*ings, secrets=secrets), self.endpoints())

    def get(self, host: str, path: str = "/") -> Any:
        return request(self.http_port, host, path)

    def get_tls(self, host: str, ctx: ssl.SSLContext) -> Any:
        return request(self.https_port, host, "/", tls=ctx)

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


@pytest.fixture
def env(echo_backends: Callable[..., Backend], cert_factory: Callable[[str], Cert]) -> Iterator[Env]:
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed")
    backends = {name: echo_backends(name) for name in ("s1", "s2")}
    state = Path(tempfile.mkdtemp(prefix="kproxy-reload-"))
    e: Env | None = None
    try:
        state.chmod(0o755)  # workers (nobody) reach their temp directories and htpasswd files
        e = Env(state, backends, cert_factory)
        yield e
    finally:
        if e is not None:
            e.nginx.stop(timeout=10)
        shutil.rmtree(state, ignore_errors=True)


def web(host: str = "a.test", backend: str = "s1", name: str | None = None, **kw: Any) -> dict[str, Any]:
    return ingress(name or host.split(".")[0], rule(host, path("/", backend)), **kw)


def tls_secret(name: str, cert: Cert, key_from: Cert | None = None) -> dict[str, Any]:
    s = cert.secret(name)
    if key_from is not None:
        s["data"]["tls.key"] = base64.b64encode(key_from.key.read_bytes()).decode()
    return s


def trusting(*certs: Cert) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for c in certs:
        ctx.load_verify_locations(str(c.crt))
    return ctx


# --- start, write on change ------------------------------------------------------------------


def test_first_apply_starts_nginx_and_writes_files_with_their_modes(env: Env, htpasswd_secret: Any) -> None:
    a = env.cert("a.test")
    result = env.apply(
        web("a.test", tls=[{"hosts": ["a.test"], "secretName": "tls-a"}]),
        web("auth.test", "s2", ann={P + "auth-type": "basic", P + "auth-secret": "users"}),
        secrets=[tls_secret("tls-a", a), htpasswd_secret("users", "alice", "wonder")],
    )
    assert result.ok and result.changed and result.started, result.error
    assert env.get_tls("a.test", trusting(a)).backend == "s1"
    assert env.get("auth.test").status == 401
    auth = base64.b64encode(b"alice:wonder").decode()
    assert request(env.http_port, "auth.test", headers={"Authorization": f"Basic {auth}"}).backend == "s2"

    files = sorted((env.state / "certs").iterdir())
    assert {f.suffix for f in files} == {".crt", ".key", ".htpasswd"}
    for f in files:
        st = f.stat()
        if f.suffix in (".crt", ".key"):
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid(), f
        else:
            assert stat.S_IMODE(st.st_mode) == 0o640, f
            if worker_user() is not None:
                assert st.st_gid == grp.getgrnam(worker_user()[1]).gr_gid  # type: ignore[index]
    assert stat.S_IMODE((env.state / "certs").stat().st_mode) == 0o711
    assert (env.state / "nginx.conf").read_text() == result.config.text
    assert env.gauge("kproxy_ingress_config_last_reload_successful") == 1.0


def test_the_same_configuration_is_neither_written_nor_reloaded(env: Env) -> None:
    assert env.apply(web()).ok
    conf = env.state / "nginx.conf"
    before = (conf.stat().st_ino, conf.stat().st_mtime_ns, env.nginx.pid(), env.nginx.workers(), env.tests_run)
    again = env.apply(web())
    assert again.ok and not again.changed
    after = (conf.stat().st_ino, conf.stat().st_mtime_ns, env.nginx.pid(), env.nginx.workers(), env.tests_run)
    assert after == before
    assert env.gauge("kproxy_ingress_success_total") == 1.0


def test_a_change_reloads_swaps_atomically_and_removes_unreferenced_files(env: Env) -> None:
    a, b = env.cert("a.test"), env.cert("b.test")
    first = env.apply(
        web("a.test", tls=[{"hosts": ["a.test"], "secretName": "tls-a"}]), secrets=[tls_secret("tls-a", a)]
    )
    assert first.ok
    old_files = {p for p, _ in first.config.files}
    workers = env.nginx.workers()
    # The Secret's content changes (a new certificate for the same host): new file names.
    second = env.apply(
        web("a.test", tls=[{"hosts": ["a.test"], "secretName": "tls-a"}]), secrets=[tls_secret("tls-a", b)]
    )
    assert second.ok and second.changed and not second.started
    assert env.nginx.workers() - workers  # a new generation of workers (the old one drains away)
    assert (env.state / "nginx.conf").read_text() == second.config.text
    assert not any(Path(p).exists() for p in old_files)
    assert all(Path(p).exists() for p, _ in second.config.files)
    # It serves the new certificate (issued for b.test; a.test's name does not verify with it).
    ctx = trusting(b)
    ctx.check_hostname = False
    assert request(env.https_port, "a.test", tls=ctx).peer_cert_subject == "b.test"
    # Dropping TLS removes its files.
    third = env.apply(web("a.test"))
    assert third.ok and not list((env.state / "certs").iterdir())


# --- reload while a request is in flight ------------------------------------------------------


class _SlowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        srv: Any = self.server
        srv.arrived.set()
        released = srv.release.wait(30)
        body = b"slow and complete" if released else b"timed out"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_reload_does_not_drop_an_in_flight_request(env: Env) -> None:
    slow = ThreadingHTTPServer((LOOPBACK, 0), _SlowHandler)
    slow.block_on_close = True
    slow.daemon_threads = False
    slow.arrived = threading.Event()  # type: ignore[attr-defined]
    slow.release = threading.Event()  # type: ignore[attr-defined]
    serve = threading.Thread(target=slow.serve_forever, kwargs={"poll_interval": 0.05})
    serve.start()
    env.backends["s2"] = Backend("slow", slow.server_address[1], slow, serve)
    try:
        assert env.apply(web("slow.test", "s2")).ok
        answer: dict[str, Any] = {}

        def client() -> None:
            conn = http.client.HTTPConnection(LOOPBACK, env.http_port, timeout=30)
            try:
                conn.request("GET", "/", headers={"Host": "slow.test"})
                resp = conn.getresponse()
                answer["status"], answer["body"] = resp.status, resp.read()
            except OSError as e:
                answer["error"] = repr(e)
            finally:
                conn.close()

        t = threading.Thread(target=client)
        t.start()
        assert slow.arrived.wait(10), "the request never reached the backend"  # type: ignore[attr-defined]
        old_workers = env.nginx.workers()
        # Reload while the backend holds the request: a new host appears.
        result = env.apply(web("slow.test", "s2"), web("new.test", "s1"))
        assert result.ok and result.changed
        assert env.get("new.test").backend == "s1"  # the new configuration serves
        assert old_workers & set(_all_pids())  # the old worker still drains our request
        slow.release.set()  # type: ignore[attr-defined]
        t.join(30)
        assert answer == {"status": 200, "body": b"slow and complete"}, answer
        wait_until(lambda: not (old_workers & set(_all_pids())), 10, "the old worker to exit")
    finally:
        slow.release.set()  # type: ignore[attr-defined]
        env.nginx.stop()
        env.backends["s2"].stop()


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


# --- a broken configuration ------------------------------------------------------------------


def test_a_broken_configuration_is_kept_out_and_the_old_one_keeps_serving(env: Env) -> None:
    good = env.apply(web("a.test"))
    assert good.ok
    conf = env.state / "nginx.conf"
    workers = env.nginx.workers()

    bad = env.apply(web("a.test", "s2"), web(BROKEN_HOST, "s1"))
    assert not bad.ok and not bad.changed
    assert "no_such_directive" in bad.error
    assert bad.involved == (IngressRef("default", "broken"),)
    assert conf.read_text() == good.config.text  # the swap never happened
    assert (env.state / "nginx.conf.rejected").read_text() == bad.config.text
    assert not (env.state / "nginx.conf.candidate").exists()
    assert env.nginx.workers() == workers  # no reload
    assert env.get("a.test").backend == "s1"  # still the old routes, over real HTTP
    assert env.get(BROKEN_HOST).status == 404
    assert env.gauge("kproxy_ingress_config_last_reload_successful") == 0.0
    assert env.gauge("kproxy_ingress_reload_failures_total") == 1.0

    # The same rejected text is not checked again.
    runs = env.tests_run
    assert not env.apply(web("a.test", "s2"), web(BROKEN_HOST, "s1")).ok
    assert env.tests_run == runs and env.gauge("kproxy_ingress_reload_failures_total") == 1.0

    fixed = env.apply(web("a.test", "s2"), web("fixed.test", "s1"))
    assert fixed.ok and fixed.changed
    assert env.get("a.test").backend == "s2" and env.get("fixed.test").backend == "s1"
    assert env.gauge("kproxy_ingress_config_last_reload_successful") == 1.0


def test_one_bad_tls_secret_does_not_block_the_others(env: Env) -> None:
    a, b, other = env.cert("a.test"), env.cert("b.test"), env.cert("other.test")
    result = env.apply(
        web("a.test", tls=[{"hosts": ["a.test"], "secretName": "tls-a"}]),
        web("b.test", "s2", tls=[{"hosts": ["b.test"], "secretName": "tls-b"}]),
        secrets=[tls_secret("tls-a", a), tls_secret("tls-b", b, key_from=other)],  # b's key is not its own
    )
    assert result.ok, result.error
    (rej,) = result.rejected_tls
    assert (rej.host, rej.secret, rej.ingress) == ("b.test", "default/tls-b", IngressRef("default", "b"))
    assert "key values mismatch" in rej.error
    assert any(r.ref == "Ingress default/b" and "nginx rejected" in r.message for r in result.table.reasons)
    assert env.get_tls("a.test", trusting(a)).backend == "s1"  # the good host serves HTTPS
    with pytest.raises(ssl.SSLError):
        env.get_tls("b.test", trusting(b))  # the bad one fails closed...
    redirect = env.get("b.test")
    assert redirect.status == 308 and redirect.headers["location"].startswith("https://b.test")  # ...not plaintext
    assert env.gauge("kproxy_ingress_tls_certificates_rejected") == 1.0
    # No file of the rejected key is left behind.
    keys = {p.read_bytes() for p in (env.state / "certs").glob("*.key")}
    assert other.key.read_bytes() not in keys and len(keys) == 1


# --- nginx itself ----------------------------------------------------------------------------


def test_a_reload_nginx_does_not_take_puts_the_previous_file_back(env: Env) -> None:
    assert env.apply(web()).ok
    good_text = (env.state / "nginx.conf").read_text()
    # A port someone else listens on: nginx -t lets EADDRINUSE pass, the master refuses at reload.
    squatter = socket.socket()
    squatter.bind((LOOPBACK, 0))
    squatter.listen()
    try:
        env.reloader.options = replace(env.options, http_port=squatter.getsockname()[1])
        result = env.apply(web())
        assert not result.ok and "did not take" in result.error
        assert "Address already in use" in result.error  # nginx's own bind() message, from its log
        assert (env.state / "nginx.conf").read_text() == good_text
        assert env.get("a.test").backend == "s1"
        assert env.gauge("kproxy_ingress_config_last_reload_successful") == 0.0
    finally:
        squatter.close()
    env.reloader.options = env.options
    assert env.apply(web("a.test", "s2")).ok
    assert env.get("a.test").backend == "s2"


def test_a_dead_nginx_is_started_again(env: Env) -> None:
    assert env.apply(web()).ok
    pid = env.nginx.pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not env.nginx.running(), 10, "nginx to exit")
    result = env.apply(web())
    assert result.ok and result.started and env.nginx.pid() != pid
    assert env.get("a.test").backend == "s1"


def test_a_master_left_by_an_earlier_controller_is_adopted(env: Env) -> None:
    assert env.apply(web()).ok
    pid = env.nginx.pid()
    # A new controller process: fresh Reloader and NginxProcess over the same state directory.
    other = NginxProcess(
        NGINX, str(env.state), str(env.state / "nginx.conf"), str(env.state / "nginx.pid"), str(env.state / "nginx.log")
    )
    assert other.pid() == pid
    again = Reloader(other, env.options, conf_path=str(env.state / "nginx.conf"))
    result = again.apply(env.table(web("a.test", "s2")), env.endpoints())
    assert result.ok and not result.started and other.pid() == pid
    assert env.get("a.test").backend == "s2"


def test_a_long_cors_header_list_is_refused_and_the_configuration_still_loads(env: Env) -> None:
    # nginx refuses tokens over 4096 bytes; the rendered list is bounded below that, so an
    # over-long value is refused on its own Ingress instead of breaking every reload.
    headers = ",".join(f"X-H{i}" for i in range(600))
    ing = web("cors.test", ann={P + "enable-cors": "true", P + "cors-allow-headers": headers})
    assert any("cors-allow-headers" in str(r) for r in env.table(ing).reasons)
    env.reloader = Reloader(env.nginx, env.options, conf_path=str(env.state / "nginx.conf"))
    assert env.apply(ing).ok
    too_long = ",".join(f"X-H{i}" for i in range(300))  # about 2,200 characters rendered
    short = ",".join(f"X-H{i}" for i in range(250))
    assert env.table(web("cors.test", ann={P + "enable-cors": "true", P + "cors-allow-headers": short})).reasons == ()
    assert any(
        "cors-allow-headers" in str(r)
        for r in env.table(
            web("cors.test", ann={P + "enable-cors": "true", P + "cors-allow-headers": too_long})
        ).reasons
    )
