"""Routes → nginx.conf: determinism, what each feature renders, and `nginx -t` on the result.

`nginx -t` runs Debian's nginx against a temporary prefix (pid, temp paths and logs all inside
it), so these tests need neither root nor a running nginx.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Sibling test module with the shared builders (pytest's default "prepend" import mode puts
# this directory on sys.path).
from test_ingress_routes import CLASS, P, backend, fake_tls_secret, ingress, path, rule, svc

from kproxy.errors import ConfigError
from kproxy.ingress.convert import build_routes
from kproxy.ingress.model import RoutingTable
from kproxy.ingress.nginx import NginxConfig, NginxOptions, UpstreamMode, render
from kproxy.model import Endpoint, Service, ServicePortName
from kproxy.testing.certs import make_cert

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl")
SERVICES = [svc("s1"), svc("s2", ip="172.30.0.11"), svc("web", ip="fd00::10")]


def tbl(*ings: dict[str, Any], services: list[Service] | None = None, **kw: Any) -> RoutingTable:
    kw.setdefault("ingress_classes", [CLASS])
    return build_routes(list(ings), SERVICES if services is None else services, **kw)


def opts(tmp: Path | str = "/var/lib/kproxy/ingress", **kw: Any) -> NginxOptions:
    kw.setdefault("cert_dir", f"{tmp}/certs")
    return NginxOptions(run_dir=str(tmp), **kw)


def location_block(text: str, header: str) -> str:
    """The body of the first block whose opening line is `header` (exact, stripped)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == header + " {":
            depth, out = 1, []
            for body in lines[i + 1 :]:
                depth += body.count("{") - body.count("}")
                if depth == 0:
                    return "\n".join(out)
                out.append(body.strip())
    raise AssertionError(f"no block {header!r} in:\n{text}")


def server_block(text: str, name: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"server_name {name};":
            start = max(j for j in range(i) if lines[j].strip() == "server {")
            depth, out = 0, []
            for body in lines[start:]:
                depth += body.count("{") - body.count("}")
                out.append(body)
                if depth == 0:
                    return "\n".join(out)
    raise AssertionError(f"no server {name}")


# --- nginx -t --------------------------------------------------------------------------------


def nginx_check(cfg: NginxConfig, prefix: Path) -> subprocess.CompletedProcess[str]:
    """Write the config and its files under `prefix` and run ``nginx -t`` there."""
    for p, spec in cfg.files:
        f = Path(p)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(spec.content)
        f.chmod(spec.mode)
    conf = prefix / "nginx.conf"
    conf.write_text(cfg.text)
    return subprocess.run(
        [NGINX, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def prefix() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kproxy-nginx-t-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def real_tls_secrets() -> Iterator[list[dict[str, Any]]]:
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    d = Path(tempfile.mkdtemp(prefix="kproxy-certs-"))
    try:
        out = [
            make_cert(d, host).secret(name) for name, host in (("tls-a", "a.example.com"), ("tls-w", "*.w.example.com"))
        ]
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- determinism -----------------------------------------------------------------------------


def everything(
    secrets: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A feature-rich set of Ingresses (and Secrets) used by several tests."""
    htpasswd = {
        "metadata": {"name": "users", "namespace": "default"},
        "data": {"auth": base64.b64encode(b"alice:$apr1$Jh8zqHqO$DjHUSZwO3YB4CCymqAC8j/\n").decode()},
    }
    ings = [
        ingress(
            "plain",
            rule("a.example.com", path("/", "s1"), path("/api", "s2"), path("/x", "s1", type="Exact")),
            tls=[{"hosts": ["a.example.com"], "secretName": "tls-a"}],
            created="2020-01-01T00:00:00Z",
        ),
        ingress(
            "wild",
            rule("*.w.example.com", path("/", "s2")),
            tls=[{"hosts": ["*.w.example.com"], "secretName": "tls-w"}],
        ),
        ingress(
            "rx",
            rule(
                "rx.example.com",
                path("/api(/|$)(.*)", "s1", type="ImplementationSpecific"),
                path("/exact", "s2", type="Exact"),
            ),
            ann={P + "rewrite-target": "/$2", P + "use-regex": "true"},
        ),
        ingress(
            "cors",
            rule("cors.example.com", path("/", "s1")),
            ann={
                P + "enable-cors": "true",
                P + "cors-allow-origin": "https://app.example.com, https://*.b.example",
                P + "cors-expose-headers": "X-Trace",
                P + "cors-allow-credentials": "false",
            },
        ),
        ingress(
            "limits",
            rule("rl.example.com", path("/", "s1")),
            ann={
                P + "limit-rps": "3",
                P + "limit-rpm": "100",
                P + "limit-connections": "4",
                P + "limit-burst-multiplier": "2",
            },
        ),
        ingress(
            "auth",
            rule("auth.example.com", path("/", "s1")),
            ann={P + "auth-type": "basic", P + "auth-secret": "users", P + "auth-realm": "Staff; only"},
        ),
        ingress("main", rule("canary.example.com", path("/", "s1"), path("/w", "s1"))),
        ingress(
            "canary",
            rule("canary.example.com", path("/", "s2"), path("/w", "s2")),
            ann={P + "canary": "true", P + "canary-by-header": "X-Canary", P + "canary-weight": "25"},
        ),
        ingress(
            "allow",
            rule("allow.example.com", path("/", "s1")),
            ann={P + "whitelist-source-range": "10.0.0.0/8, 2001:db8::/32, 192.168.1.7"},
        ),
        ingress(
            "proto",
            rule("proto.example.com", path("/h", "s1"), path("/g", "s2")),
            ann={
                P + "backend-protocol": "GRPCS",
                P + "proxy-read-timeout": "120",
                P + "proxy-body-size": "8m",
            },
        ),
        ingress(
            "redir",
            rule("redir.example.com", path("/", "s1")),
            ann={
                P + "permanent-redirect": "https://new.example.com/path?x=1",
                P + "permanent-redirect-code": "308",
            },
        ),
        ingress("approot", rule("approot.example.com", path("/", "s1")), ann={P + "app-root": "/app"}),
        ingress("force", rule("force.example.com", path("/", "web")), ann={P + "force-ssl-redirect": "true"}),
        ingress("closed", rule("closed.example.com", path("/", "s1")), ann={P + "server-snippet": "return 200;"}),
        ingress("catch", default_backend=backend("s2")),
    ]
    return ings, [
        htpasswd,
        *(secrets if secrets is not None else [fake_tls_secret("tls-a"), fake_tls_secret("tls-w")]),
    ]


def test_render_is_deterministic_whatever_the_input_order() -> None:
    ings, secrets = everything()
    first = render(tbl(*ings, secrets=secrets))
    for seed in range(5):
        shuffled = ings[:]
        random.Random(seed).shuffle(shuffled)
        again = render(tbl(*shuffled, secrets=list(reversed(secrets))))
        assert again.text == first.text
        assert again.files == first.files
        assert again.reasons == first.reasons


def test_render_has_the_main_context_and_proxy_defaults() -> None:
    text = render(tbl(), opts("/run/kp", worker_processes=2, user=("nobody", "nogroup"))).text
    for line in (
        'user "nobody" "nogroup";',
        "worker_processes 2;",
        'pid "/run/kp/nginx.pid";',
        'error_log "stderr" notice;',
        "events {",
        "http {",
        'client_body_temp_path "/run/kp/client_body_temp";',
        "proxy_http_version 1.1;",
        "proxy_set_header Connection $kproxy_connection;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "access_log off;",
    ):
        assert line in text
    # Connection is "" for every request that is not an upgrade: upstream keepalive works.
    assert location_block(text, "map $http_upgrade $kproxy_connection") == 'default "upgrade";\n"" "";'


def test_server_names_hash_bucket_fits_the_longest_name() -> None:
    long_host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(long_host) == 253
    text = render(tbl(ingress("long", rule(long_host, path("/", "s1"))))).text
    assert "server_names_hash_bucket_size 512;" in text
    assert "server_names_hash_bucket_size 64;" in render(tbl()).text


def test_empty_table_still_answers_404_and_rejects_unknown_tls() -> None:
    text = render(tbl(), opts(http_port=8080, https_port=8443, listen_addresses=("127.0.0.1", "::1"))).text
    catch_all = server_block(text, '"_"')
    assert "listen 127.0.0.1:8080 default_server;" in catch_all
    assert "listen [::1]:8443 ssl http2 default_server;" in catch_all
    assert "ssl_reject_handshake on;" in catch_all
    assert location_block(catch_all, 'location "/"') == "return 404;"


def test_default_certificate_replaces_handshake_rejection() -> None:
    text = render(tbl(), opts(default_certificate=("/etc/kp/default.crt", "/etc/kp/default.key"))).text
    assert 'ssl_certificate "/etc/kp/default.crt";' in text
    assert "ssl_reject_handshake" not in text


# --- upstreams -------------------------------------------------------------------------------


def test_service_mode_uses_the_cluster_ip_as_the_only_server() -> None:
    cfg = render(tbl(ingress("a", rule("a.example.com", path("/", "s1"), path("/v6", "web")))))
    up1 = [b for b in cfg.text.split("upstream ")[1:] if "172.30.0.10:80" in b]
    assert len(up1) == 1 and "keepalive 32;" in up1[0]
    assert "server [fd00::10]:80;" in cfg.text


def test_endpoints_mode_lists_ready_endpoints_sorted_and_503_without_any() -> None:
    t = tbl(ingress("a", rule("a.example.com", path("/", "s1"), path("/two", "s2"))))
    eps = {
        ServicePortName("default", "s1", "http", svc("s1").ports[0].protocol): [
            Endpoint("10.0.0.9", 8080),
            Endpoint("10.0.0.10", 8080),
            Endpoint("10.0.0.11", 8080, ready=False, serving=False),
        ],
    }
    cfg = render(t, NginxOptions(upstream_mode=UpstreamMode.ENDPOINTS), eps)
    block = [b for b in cfg.text.split("upstream ")[1:] if "10.0.0.10:8080" in b][0]
    assert block.index("10.0.0.10:8080") < block.index("10.0.0.9:8080")
    assert "10.0.0.11" not in cfg.text
    assert location_block(cfg.text, 'location "/two/"') == "return 503;"
    assert any("no ready endpoints" in r.message for r in cfg.reasons)


def test_endpoints_mode_falls_back_to_serving_terminating_endpoints() -> None:
    t = tbl(ingress("a", rule("a.example.com", path("/", "s1"))))
    name = svc("s1").ports[0].name
    cfg = render(
        t,
        NginxOptions(upstream_mode=UpstreamMode.ENDPOINTS),
        {name: [Endpoint("10.0.0.9", 80, ready=False, serving=True, terminating=True)]},
    )
    assert "server 10.0.0.9:80;" in cfg.text


def test_headless_service_in_service_mode_answers_503_with_a_reason() -> None:
    base = svc("hl")
    headless = dataclasses.replace(base, ports=(dataclasses.replace(base.ports[0], cluster_ips=()),))
    cfg = render(tbl(ingress("a", rule("a.example.com", path("/", "hl"))), services=[headless]))
    assert location_block(server_block(cfg.text, '"a.example.com"'), 'location "/"') == "return 503;"
    assert any("headless" in r.message for r in cfg.reasons)


# --- paths → locations (ingress-nginx's table, with the seed's semantics) --------------------


def test_path_types_become_the_expected_locations() -> None:
    t = tbl(
        ingress(
            "a",
            rule(
                "a.example.com",
                path("/", "s1"),
                path("/p", "s1"),
                path("/both", "s1"),
                path("/both", "s2", type="Exact"),
                path("/e/", "s2", type="Exact"),
                path("/impl", "s2", type="ImplementationSpecific"),
            ),
        )
    )
    server = server_block(render(t).text, '"a.example.com"')
    locations = [ln.strip() for ln in server.splitlines() if ln.strip().startswith("location")]
    assert sorted(locations) == sorted(
        [
            'location "/" {',
            'location "/p/" {',
            'location = "/p" {',
            'location "/both/" {',
            'location = "/both" {',  # one exact twin: the Exact route's
            'location = "/e/" {',
            'location = "/e" {',  # "/e" must not get nginx's 301 to "/e/"
            'location "/impl" {',
        ]
    )
    assert 'proxy_pass "http://default_s2_80_' in location_block(server, 'location = "/both"')
    assert 'proxy_pass "http://default_s1_80_' in location_block(server, 'location "/both/"')


def test_regex_host_renders_only_regex_locations_in_route_order() -> None:
    ings, secrets = everything()
    server = server_block(render(tbl(*ings, secrets=secrets)).text, '"rx.example.com"')
    locations = [ln.strip() for ln in server.splitlines() if ln.strip().startswith("location")]
    assert locations == [
        'location ~* "^/api(/|$)(.*)" {',
        'location ~ "^/exact$" {',
        'location "/" {',
    ]
    assert 'rewrite "(?i)^/api(/|$)(.*)" "/$2" break;' in server


# --- TLS and redirects -----------------------------------------------------------------------


def test_tls_files_are_deterministic_with_private_key_mode_0600() -> None:
    ings, secrets = everything()
    cfg = render(tbl(*ings, secrets=secrets), opts("/srv/kp"))
    files = cfg.file_map
    keys = [p for p in files if p.endswith(".key")]
    crts = [p for p in files if p.endswith(".crt")]
    assert len(keys) == len(crts) == 2
    assert all(p.startswith("/srv/kp/certs/tls_default_tls-") for p in keys + crts)
    assert {files[p].mode for p in keys} == {0o600} and {files[p].mode for p in crts} == {0o644}
    server = server_block(cfg.text, '"a.example.com"')
    assert f'ssl_certificate_key "{[k for k in keys if "tls-a" in k][0]}";' in server
    assert "listen 0.0.0.0:443 ssl http2;" in server
    wild = server_block(cfg.text, '"~^[^.]+\\\\.w\\\\.example\\\\.com$"')
    assert "ssl_certificate" in wild


def test_ssl_redirect_defaults_on_for_tls_hosts_with_308() -> None:
    ings, secrets = everything()
    text = render(tbl(*ings, secrets=secrets), opts(https_port=8443)).text
    root = location_block(server_block(text, '"a.example.com"'), 'location "/"')
    assert 'if ($scheme = "http") {\nreturn 308 "https://$host:8443$request_uri";\n}' in root
    assert "return 308" not in server_block(text, '"cors.example.com"')  # no TLS, no redirect
    force = server_block(text, '"force.example.com"')
    assert "listen 0.0.0.0:8443" not in force
    assert 'return 308 "https://$host:8443$request_uri";' in force  # force-ssl-redirect without TLS


def test_ssl_redirect_false_disables_the_redirect() -> None:
    t = tbl(
        ingress(
            "a",
            rule("a.example.com", path("/", "s1")),
            ann={P + "ssl-redirect": "false"},
            tls=[{"hosts": ["a.example.com"], "secretName": "c"}],
        ),
        secrets=[fake_tls_secret("c")],
    )
    assert "return 308" not in render(t).text


def test_tls_without_usable_secret_keeps_https_and_redirect() -> None:
    t = tbl(ingress("a", rule("a.example.com", path("/", "s1")), tls=[{"hosts": ["a.example.com"]}]))
    server = server_block(render(t).text, '"a.example.com"')
    assert "listen 0.0.0.0:443 ssl http2;" in server
    assert "ssl_reject_handshake on;" in server
    assert 'return 308 "https://$host$request_uri";' in server


# --- annotations rendered --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rich() -> str:
    ings, secrets = everything()
    return render(tbl(*ings, secrets=secrets)).text


def test_cors_preflight_is_answered_204_with_ingress_nginx_defaults(rich: str) -> None:
    body = location_block(server_block(rich, '"cors.example.com"'), 'location "/"')
    preflight = location_block(body, 'if ($request_method = "OPTIONS")')
    assert preflight.endswith("return 204;")
    assert '"Access-Control-Allow-Methods" "GET, PUT, POST, DELETE, PATCH, OPTIONS" always;' in body
    assert (
        '"Access-Control-Allow-Headers" "DNT, Keep-Alive, User-Agent, X-Requested-With, If-Modified-Since, '
        'Cache-Control, Content-Type, Range, Authorization" always;'
    ) in body
    assert '"Access-Control-Max-Age" "1728000" always;' in body
    assert "return 204;" in body
    assert '"Access-Control-Expose-Headers" "X-Trace" always;' in body
    assert "Access-Control-Allow-Credentials" not in body
    assert '"~*^https://app\\\\.example\\\\.com$" $http_origin;' in rich
    assert '"~*^https://[a-z0-9-]+\\\\.b\\\\.example$" $http_origin;' in rich


def test_cors_star_origin_is_literal() -> None:
    t = tbl(ingress("c", rule("c.example.com", path("/", "s1")), ann={P + "enable-cors": "true"}))
    body = location_block(server_block(render(t).text, '"c.example.com"'), 'location "/"')
    assert '"Access-Control-Allow-Origin" "*" always;' in body
    assert '"Access-Control-Allow-Credentials" "true" always;' in body


def test_rate_limits_render_zones_and_503(rich: str) -> None:
    body = location_block(server_block(rich, '"rl.example.com"'), 'location "/"')
    assert "limit_conn kproxy_conn_default_limits_" in body and body.split("limit_conn ")[1].split(";")[0].endswith(
        " 4"
    )
    assert "burst=6 nodelay;" in body and "burst=200 nodelay;" in body
    assert "rate=3r/s;" in rich and "rate=100r/m;" in rich
    assert "limit_req_status 503;" in rich and "limit_conn_status 503;" in rich


def test_basic_auth_references_a_deterministic_htpasswd_file() -> None:
    ings, secrets = everything()
    cfg = render(tbl(*ings, secrets=secrets), opts("/srv/kp"))
    body = location_block(server_block(cfg.text, '"auth.example.com"'), 'location "/"')
    assert 'auth_basic "Staff; only";' in body
    (auth_path,) = [p for p in cfg.file_map if p.endswith(".htpasswd")]
    assert auth_path.startswith("/srv/kp/certs/auth_default_users_")
    assert f'auth_basic_user_file "{auth_path}";' in body
    assert cfg.file_map[auth_path].content == b"alice:$apr1$Jh8zqHqO$DjHUSZwO3YB4CCymqAC8j/\n"
    assert cfg.file_map[auth_path].mode == 0o640


def test_canary_by_header_and_weight_adds_no_location(rich: str) -> None:
    server = server_block(rich, '"canary.example.com"')
    assert server.count("location") == 3  # "/", "/w/", "= /w": the canary adds none
    body = location_block(server, 'location "/"')
    assert body.startswith("set $kproxy_upstream $kproxy_canary_default_canary_")
    assert 'if ($http_x_canary = "never") {' in body and 'if ($http_x_canary = "always") {' in body
    assert body.rstrip().endswith('proxy_pass "http://$kproxy_upstream";')
    assert 'split_clients "$request_id" $kproxy_canary_default_canary_' in rich and "25% " in rich


def test_canary_by_header_value() -> None:
    t = tbl(
        ingress("m", rule("c.example.com", path("/", "s1")), created="2020-01-01T00:00:00Z"),
        ingress(
            "c",
            rule("c.example.com", path("/", "s2")),
            ann={P + "canary": "true", P + "canary-by-header": "X-Env", P + "canary-by-header-value": "beta"},
        ),
    )
    body = location_block(server_block(render(t).text, '"c.example.com"'), 'location "/"')
    assert 'if ($http_x_env = "beta") {' in body
    assert "never" not in body and "split_clients" not in render(t).text


def test_allow_list_and_fail_closed(rich: str) -> None:
    body = location_block(server_block(rich, '"allow.example.com"'), 'location "/"')
    assert "allow 10.0.0.0/8;\nallow 192.168.1.7/32;\nallow 2001:db8::/32;\ndeny all;" in body
    assert location_block(server_block(rich, '"closed.example.com"'), 'location "/"') == "return 503;"


def test_backend_protocol_timeouts_body_size(rich: str) -> None:
    body = location_block(server_block(rich, '"proto.example.com"'), 'location "/g/"')
    assert "grpc_read_timeout 120s;" in body and "client_max_body_size 8m;" in body
    assert body.endswith('grpc_pass "grpcs://' + body.split('grpc_pass "grpcs://')[1])
    t = tbl(ingress("h", rule("h.example.com", path("/", "s1")), ann={P + "backend-protocol": "HTTPS"}))
    assert 'proxy_pass "https://default_s1_80_' in render(t).text


def test_permanent_redirect_and_app_root(rich: str) -> None:
    body = location_block(server_block(rich, '"redir.example.com"'), 'location "/"')
    assert 'return 308 "https://new.example.com/path?x=1";' in body and "proxy_pass" not in body
    body = location_block(server_block(rich, '"approot.example.com"'), 'location "/"')
    assert 'if ($uri = "/") {\nreturn 302 "/app";\n}' in body


def test_catch_all_default_backend(rich: str) -> None:
    body = location_block(server_block(rich, '"_"'), 'location "/"')
    assert body.startswith('proxy_pass "http://default_s2_80_')


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"run_dir": "relative"},
        {"cert_dir": "/a b"},
        {"cert_dir": '/x";'},
        {"run_dir": "/x$y"},
        {"http_port": 0},
        {"listen_addresses": ("localhost",)},
        {"listen_addresses": ()},
        {"error_log": "/x;y"},
        {"user": ("root;", "x")},
        {"default_certificate": ("/ok", "rel")},
    ],
)
def test_unsafe_options_are_a_config_error(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        NginxOptions(**kw)


# --- nginx -t --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(UpstreamMode))
def test_feature_rich_config_passes_nginx_t(
    mode: UpstreamMode, prefix: Path, real_tls_secrets: list[dict[str, Any]]
) -> None:
    ings, secrets = everything(real_tls_secrets)
    t = tbl(*ings, secrets=secrets)
    eps = {sp.name: [Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080)] for s in SERVICES for sp in s.ports}
    cfg = render(
        t,
        opts(prefix, http_port=18080, https_port=18443, listen_addresses=("127.0.0.1",), upstream_mode=mode),
        eps,
    )
    result = nginx_check(cfg, prefix)
    assert result.returncode == 0, result.stderr + "\n" + cfg.text


def test_tls_less_and_https_less_configs_pass_nginx_t(prefix: Path) -> None:
    ings, secrets = everything()
    secrets = [s for s in secrets if s.get("type") != "kubernetes.io/tls"]  # no certs at all
    cfg = render(tbl(*ings, secrets=secrets), opts(prefix, https_port=None, listen_addresses=("127.0.0.1",)))
    assert "ssl" not in cfg.text.replace("ssl_redirect", "")
    result = nginx_check(cfg, prefix)
    assert result.returncode == 0, result.stderr
