"""ingress-nginx annotations (prefix ``nginx.ingress.kubernetes.io/``) → `RouteOptions`.

Guarantees:
- Every value is checked against a strict grammar before it is kept (booleans as Go's
  ParseBool, bounded integers, sizes like ``8m``, CIDRs through `ipaddress`, header names
  ``[A-Za-z0-9-]+``, origins, method lists, paths, URLs). Nothing outside printable ASCII, no
  quotes, braces, semicolons, backslashes or `$` (except ``$1``..``$9`` in ``rewrite-target``)
  ever reaches a `RouteOptions`; the renderer quotes on top of that.
- Every annotation with our prefix is accounted for: applied, or named in a `Reason`. Unknown
  and unsupported ones are never silently ignored.
- Failure mode: an invalid ordinary annotation is ignored with a reason (what ingress-nginx
  does). A security-relevant one (``auth-*``, allow/deny lists, ``satisfy``, any ``*-snippet``)
  that cannot be applied exactly as written makes the whole Ingress fail closed
  (`RouteOptions.deny`): its locations answer 503 instead of serving unprotected. Snippets are
  refused outright (raw nginx text is the IngressNightmare vector) and fail closed too, because a
  snippet may carry access rules kproxy would otherwise drop.

Why one module of ~500 lines: one grammar per supported annotation, side by side with the table
the reference is generated from.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kproxy.ingress.model import (
    BackendProtocol,
    BasicAuth,
    CanaryPolicy,
    Cors,
    IngressRef,
    RateLimit,
    Reason,
    RouteOptions,
)

PREFIX = "nginx.ingress.kubernetes.io/"
MAX_VALUE_LEN = 4096  # longer values are refused before any pattern runs on them
MAX_HTPASSWD_LEN = 1 << 20

SecretLookup = Mapping[tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class ParsedAnnotations:
    options: RouteOptions
    canary: CanaryPolicy | None  # None: not a canary Ingress
    reasons: tuple[Reason, ...]


class _Bad(ValueError):
    """An annotation value outside its grammar (message says which)."""


# --- grammar -------------------------------------------------------------------------------

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_HEADER = re.compile(r"[A-Za-z0-9-]{1,128}")
_METHOD = re.compile(r"[A-Za-z]{1,32}")
_SIZE = re.compile(r"[0-9]{1,9}[kKmMgG]?")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ORIGIN = re.compile(rf"(https?)://(\*\.)?({_DNS_LABEL}(?:\.{_DNS_LABEL})*)(:[0-9]{{1,5}})?", re.IGNORECASE)
_PATHCHARS = r"A-Za-z0-9/_.~@:+,=\-"
_APP_ROOT = re.compile(rf"/[{_PATHCHARS}]{{0,1023}}")
_URL = re.compile(
    rf"https?://{_DNS_LABEL}(?:\.{_DNS_LABEL})*(?::[0-9]{{1,5}})?(?:/[{_PATHCHARS}%!*&?]{{0,2000}})?",
    re.IGNORECASE,
)
# Literal text and $1..$9 captures only; `$` followed by anything else would be an nginx variable.
_REWRITE = re.compile(rf"(?:/|\$[1-9])(?:[{_PATHCHARS}%!*&?]|\$[1-9]){{0,1023}}")
_REALM = re.compile(r"[A-Za-z0-9 _.,:;@()/+=-]{1,128}")
_SECRET_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
_NAMESPACE = re.compile(_DNS_LABEL)
_HEADER_VALUE = re.compile(r"[A-Za-z0-9_.~:/@+=,-]{1,256}")
_HTPASSWD_LINE = re.compile(r"[^:\s]{1,255}:[!-~]{1,512}")


def _bool(v: str) -> bool:
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _Bad("not a boolean (true or false)")


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", v):
            raise _Bad(f"not an integer in [{lo}, {hi}]")
        n = int(v)
        if not lo <= n <= hi:
            raise _Bad(f"not an integer in [{lo}, {hi}]")
        return n

    return parse


def _size(v: str) -> str:
    if not _SIZE.fullmatch(v):
        raise _Bad("not a size like 8m, 512k or 0")
    return v.lower()


def _list(v: str) -> list[str]:
    items = [x.strip() for x in v.split(",")]
    if not all(items):
        raise _Bad("empty item in a comma-separated list")
    return items


# nginx refuses a token over 4096 bytes, and a header list is rendered as one quoted token joined
# with ", ": bound the rendered length well below that, or one Ingress could break every reload.
MAX_HEADER_LIST_LEN = 2048


def _headers(v: str) -> tuple[str, ...]:
    items = _list(v)
    if items == ["*"]:
        return ("*",)
    for h in items:
        if not _HEADER.fullmatch(h):
            raise _Bad(f"{h[:64]!r} is not a header name ([A-Za-z0-9-]+)")
    if len(", ".join(items)) > MAX_HEADER_LIST_LEN:
        raise _Bad(f"the header list is longer than {MAX_HEADER_LIST_LEN} characters")
    return tuple(items)


def _methods(v: str) -> tuple[str, ...]:
    items = _list(v)
    for m in items:
        if not _METHOD.fullmatch(m):
            raise _Bad(f"{m[:64]!r} is not an HTTP method")
    return tuple(m.upper() for m in items)


def _origins(v: str) -> tuple[str, ...]:
    # ingress-nginx accepts commas and, in older versions, spaces between origins.
    items = [x for x in re.split(r"[,\s]+", v.strip()) if x]
    if not items:
        raise _Bad("no origin")
    if items == ["*"]:
        return ("*",)
    out = []
    for o in items:
        m = _ORIGIN.fullmatch(o)
        if not m or (m.group(4) and not 0 < int(m.group(4)[1:]) < 65536):
            raise _Bad(f"{o[:64]!r} is not an origin (scheme://host[:port], * for one label)")
        out.append(o.lower())
    return tuple(sorted(set(out)))


def _cidrs(v: str) -> tuple[str, ...]:
    out = []
    for item in _list(v):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as e:
            raise _Bad(f"{item[:64]!r} is not a CIDR or IP address") from e
    return tuple(sorted(set(out)))


def _rewrite(v: str) -> str:
    if not _REWRITE.fullmatch(v):
        raise _Bad("rewrite-target may hold path characters and $1..$9 only, starting with / or $n")
    return v


def _app_root(v: str) -> str:
    if not _APP_ROOT.fullmatch(v) or "//" in v or "/../" in v + "/" or "/./" in v + "/":
        raise _Bad("not an absolute path of [A-Za-z0-9/_.~@:+,=-]")
    return v


def _url(v: str) -> str:
    if not _URL.fullmatch(v):
        raise _Bad("not an http(s) URL without quotes, spaces or $")
    return v


def _protocol(v: str) -> BackendProtocol:
    try:
        return BackendProtocol(v.upper())
    except ValueError:
        if v.upper() in ("AUTO_HTTP", "FCGI"):
            raise _Bad(f"{v} backends are not supported by kproxy (HTTP is used)") from None
        raise _Bad("not one of HTTP, HTTPS, GRPC, GRPCS") from None


def _header_name(v: str) -> str:
    if not _HEADER.fullmatch(v):
        raise _Bad("not a header name ([A-Za-z0-9-]+)")
    return v


def _header_value(v: str) -> str:
    if not _HEADER_VALUE.fullmatch(v):
        raise _Bad("header values may use [A-Za-z0-9_.~:/@+=,-] only")
    return v


def _realm(v: str) -> str:
    if not _REALM.fullmatch(v):
        raise _Bad("realm may use letters, digits, spaces and _.,:;@()/+=- only")
    return v


# --- known names ---------------------------------------------------------------------------

_PARSERS: dict[str, Callable[[str], object]] = {
    "use-regex": _bool,
    "rewrite-target": _rewrite,
    "ssl-redirect": _bool,
    "force-ssl-redirect": _bool,
    "enable-cors": _bool,
    "cors-allow-origin": _origins,
    "cors-allow-methods": _methods,
    "cors-allow-headers": _headers,
    "cors-expose-headers": _headers,
    "cors-allow-credentials": _bool,
    "cors-max-age": _int(0, 31536000),
    "limit-rps": _int(0, 1000000),
    "limit-rpm": _int(0, 60000000),
    "limit-connections": _int(0, 1000000),
    "limit-burst-multiplier": _int(1, 1000),
    "auth-type": lambda v: v,
    "auth-secret": lambda v: v,
    "auth-secret-type": lambda v: v,
    "auth-realm": _realm,
    "whitelist-source-range": _cidrs,
    "allowlist-source-range": _cidrs,
    "backend-protocol": _protocol,
    "proxy-body-size": _size,
    "proxy-connect-timeout": _int(1, 86400),
    "proxy-send-timeout": _int(1, 86400),
    "proxy-read-timeout": _int(1, 86400),
    "app-root": _app_root,
    "permanent-redirect": _url,
    "permanent-redirect-code": _int(300, 308),
    "canary": _bool,
    "canary-by-header": _header_name,
    "canary-by-header-value": _header_value,
    "canary-weight": _int(0, 1000000),
    "canary-weight-total": _int(1, 1000000),
}

KNOWN_ANNOTATIONS = frozenset(_PARSERS)  # names (without the prefix) kproxy applies
_CANARY = frozenset(n for n in _PARSERS if n.startswith("canary"))
_CORS_DETAIL = frozenset(n for n in _PARSERS if n.startswith("cors-"))

# ingress-nginx annotations kproxy knows of but does not implement (named as such in reasons).
_UNSUPPORTED = frozenset(
    """affinity affinity-canary-behavior affinity-mode auth-cache-duration auth-cache-key
    auth-keepalive auth-method auth-proxy-set-headers auth-request-redirect auth-response-headers
    auth-signin auth-signin-redirect-param auth-snippet auth-tls-error-page
    auth-tls-match-cn auth-tls-pass-certificate-to-upstream auth-tls-secret auth-tls-verify-client
    auth-tls-verify-depth auth-url canary-by-cookie canary-by-header-pattern client-body-buffer-size
    configuration-snippet custom-http-errors default-backend denylist-source-range
    enable-access-log enable-global-auth enable-modsecurity enable-opentelemetry
    enable-owasp-core-rules enable-rewrite-log from-to-www-redirect http2-push-preload
    limit-rate limit-rate-after limit-whitelist load-balance mirror-request-body mirror-target
    preserve-trailing-slash proxy-buffer-size proxy-buffering proxy-buffers-number
    proxy-cookie-domain proxy-cookie-path proxy-http-version proxy-max-temp-file-size
    proxy-next-upstream proxy-next-upstream-timeout proxy-next-upstream-tries proxy-redirect-from
    proxy-redirect-to proxy-request-buffering proxy-ssl-ciphers proxy-ssl-name
    proxy-ssl-protocols proxy-ssl-secret proxy-ssl-server-name proxy-ssl-verify
    proxy-ssl-verify-depth satisfy server-alias server-snippet service-upstream
    session-cookie-change-on-failure session-cookie-domain session-cookie-expires
    session-cookie-max-age session-cookie-name session-cookie-path session-cookie-samesite
    session-cookie-secure ssl-ciphers ssl-passthrough ssl-prefer-server-ciphers stream-snippet
    temporal-redirect temporal-redirect-code upstream-hash-by upstream-vhost x-forwarded-prefix
    hsts hsts-include-subdomains hsts-max-age hsts-preload""".split()
)


def security_relevant(name: str) -> bool:
    """Annotations whose loss would serve a path with less protection than written."""
    return (
        name.startswith("auth-")
        or name in ("whitelist-source-range", "allowlist-source-range", "denylist-source-range", "satisfy")
        or name.endswith("snippet")
    )


# --- parsing -------------------------------------------------------------------------------


def parse_annotations(ref: IngressRef, annotations: Mapping[str, Any], secrets: SecretLookup) -> ParsedAnnotations:
    """Validate and apply the nginx annotations of one Ingress; never raises on bad input."""
    reasons: list[Reason] = []
    deny: list[str] = []
    values: dict[str, Any] = {}
    ours = sorted(k for k in annotations if isinstance(k, str) and k.startswith(PREFIX))

    def field(name: str) -> str:
        return f"metadata.annotations[{PREFIX}{name}]"

    # A canary Ingress only lends its backend to the main Ingress's location, whose
    # annotations (auth and allow lists included) apply; its own are ignored, not failed on.
    is_canary = annotations.get(PREFIX + "canary") in _TRUE

    def note(name: str, msg: str) -> None:
        if security_relevant(name) and not is_canary:
            deny.append(name)
            msg += "; the Ingress answers 503 rather than serve without it"
        else:
            msg += "; ignored"
        reasons.append(Reason(str(ref), field(name), msg))

    for key in ours:
        name = key[len(PREFIX) :]
        raw = annotations[key]
        if name.endswith("snippet"):
            note(name, "snippet annotations are refused (raw nginx configuration)")
            continue
        if name not in _PARSERS:
            if name in _UNSUPPORTED:
                note(name, "not supported by kproxy")
            else:
                note(_printable(name), "unknown annotation")
            continue
        if not isinstance(raw, str):
            note(name, f"value must be a string, got {type(raw).__name__}")
            continue
        if len(raw) > MAX_VALUE_LEN or not _printable_ascii(raw):
            note(name, f"value is not printable ASCII of at most {MAX_VALUE_LEN} characters")
            continue
        try:
            values[name] = _PARSERS[name](raw)
        except _Bad as e:
            note(name, f"invalid value {_show(raw)}: {e}")

    canary: CanaryPolicy | None = None
    if values.get("canary") is True:
        canary, extra = _canary(values)
        ignored = sorted(n for n in (key[len(PREFIX) :] for key in ours) if n not in _CANARY)
        if ignored:
            reasons.append(
                Reason(
                    str(ref),
                    "metadata.annotations",
                    "canary Ingress: the main Ingress's annotations apply, these are ignored: "
                    + ", ".join(_printable(n) for n in ignored),
                )
            )
        reasons.extend(Reason(str(ref), field(n), m) for n, m in extra)
        return ParsedAnnotations(RouteOptions(), canary, tuple(reasons))
    for n in sorted(_CANARY & values.keys() - {"canary"}):
        reasons.append(Reason(str(ref), field(n), 'has no effect without canary: "true"; ignored'))

    opts = RouteOptions(
        use_regex=bool(values.get("use-regex", False)),
        rewrite_target=values.get("rewrite-target"),
        ssl_redirect=values.get("ssl-redirect"),
        force_ssl_redirect=bool(values.get("force-ssl-redirect", False)),
        backend_protocol=values.get("backend-protocol", BackendProtocol.HTTP),
        proxy_body_size=values.get("proxy-body-size"),
        proxy_connect_timeout=values.get("proxy-connect-timeout"),
        proxy_send_timeout=values.get("proxy-send-timeout"),
        proxy_read_timeout=values.get("proxy-read-timeout"),
        app_root=values.get("app-root"),
        permanent_redirect=values.get("permanent-redirect"),
        permanent_redirect_code=values.get("permanent-redirect-code", 301),
    )
    if values.get("enable-cors") is True:
        opts = replace(opts, cors=_cors(values))
    else:
        for n in sorted(_CORS_DETAIL & values.keys()):
            reasons.append(Reason(str(ref), field(n), 'has no effect without enable-cors: "true"; ignored'))

    rl = RateLimit(
        rps=values.get("limit-rps", 0),
        rpm=values.get("limit-rpm", 0),
        connections=values.get("limit-connections", 0),
        burst_multiplier=values.get("limit-burst-multiplier", 5),
    )
    if rl.rps or rl.rpm or rl.connections:
        opts = replace(opts, rate_limit=rl)

    allow = values.get("whitelist-source-range", values.get("allowlist-source-range"))
    if allow is not None:
        opts = replace(opts, allow_cidrs=allow)

    auth_names = {"auth-type", "auth-secret", "auth-secret-type"} & {k[len(PREFIX) :] for k in ours}
    if auth_names and not ({"auth-type", "auth-secret"} & set(deny)):
        auth, err = _basic_auth(ref, values, secrets)
        if err:
            deny.append("auth-secret")
            reasons.append(
                Reason(
                    str(ref),
                    field("auth-secret" if "secret" in err else "auth-type"),
                    err + "; the Ingress answers 503 rather than serve without it",
                )
            )
        else:
            opts = replace(opts, auth=auth)
    elif "auth-realm" in values and not auth_names:
        reasons.append(Reason(str(ref), field("auth-realm"), "has no effect without auth-type; ignored"))

    if deny:
        opts = replace(opts, deny="failed closed on " + ", ".join(sorted(set(deny))))
    return ParsedAnnotations(opts, None, tuple(reasons))


def _canary(values: Mapping[str, Any]) -> tuple[CanaryPolicy, list[tuple[str, str]]]:
    extra: list[tuple[str, str]] = []
    header = values.get("canary-by-header")
    header_value = values.get("canary-by-header-value")
    if header_value is not None and header is None:
        extra.append(("canary-by-header-value", "has no effect without canary-by-header; ignored"))
        header_value = None
    weight = values.get("canary-weight", 0)
    total = values.get("canary-weight-total", 100)
    if weight > total:
        extra.append(("canary-weight", f"greater than canary-weight-total ({total}); using {total}"))
        weight = total
    return CanaryPolicy(header, header_value, weight, total), extra


def _cors(values: Mapping[str, Any]) -> Cors:
    d = Cors()
    return Cors(
        allow_origins=values.get("cors-allow-origin", d.allow_origins),
        allow_methods=values.get("cors-allow-methods", d.allow_methods),
        allow_headers=values.get("cors-allow-headers", d.allow_headers),
        expose_headers=values.get("cors-expose-headers", d.expose_headers),
        allow_credentials=values.get("cors-allow-credentials", d.allow_credentials),
        max_age=values.get("cors-max-age", d.max_age),
    )


def _basic_auth(ref: IngressRef, values: Mapping[str, Any], secrets: SecretLookup) -> tuple[BasicAuth | None, str]:
    """Basic auth from the annotations and the Secret, or a reason it cannot be honoured."""
    kind = values.get("auth-type")
    if kind is None:
        return None, "auth-secret without auth-type"
    if kind != "basic":
        return None, f"auth-type {_show(kind)} is not supported (basic only)"
    secret = values.get("auth-secret")
    if secret is None:
        return None, "auth-type basic without auth-secret"
    ns, _, name = secret.rpartition("/")
    ns = ns or ref.namespace
    if not _NAMESPACE.fullmatch(ns) or not _SECRET_NAME.fullmatch(name):
        return None, f"auth-secret {_show(secret)} is not a Secret name"
    if ns != ref.namespace:
        # A Secret of another namespace would let one tenant use (and probe) another's users.
        return None, f"auth-secret {_show(secret)} is in another namespace (not allowed)"
    secret_type = values.get("auth-secret-type", "auth-file")
    obj = secrets.get((ns, name))
    if obj is None:
        return None, f"auth-secret {ns}/{name} not found"
    data = obj.get("data") or {}
    if not isinstance(data, Mapping):
        return None, f"auth-secret {ns}/{name} has no data"
    try:
        if secret_type == "auth-file":
            if "auth" not in data:
                return None, f"auth-secret {ns}/{name} has no key 'auth'"
            text = _b64text(data["auth"])
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        elif secret_type == "auth-map":
            lines = [f"{k}:{_b64text(v).strip()}" for k, v in sorted(data.items())]
        else:
            return None, f"auth-secret-type {_show(secret_type)} is not auth-file or auth-map"
    except ValueError as e:
        return None, f"auth-secret {ns}/{name}: {e}"
    if not lines:
        return None, f"auth-secret {ns}/{name} holds no users"
    for ln in lines:
        if not (_HTPASSWD_LINE.fullmatch(ln) and ln.isprintable()):
            return None, f"auth-secret {ns}/{name} is not in htpasswd format (user:hash per line)"
    realm = values.get("auth-realm", "Authentication Required")
    return BasicAuth(realm, ns, name, "\n".join(lines) + "\n"), ""


def _b64text(v: object) -> str:
    if not isinstance(v, str) or len(v) > MAX_HTPASSWD_LEN:
        raise ValueError("value is not base64 text")
    try:
        raw = base64.b64decode(v, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError("value is not base64 of UTF-8 text") from e


def _printable_ascii(v: str) -> bool:
    return v.isascii() and v.isprintable()


def _printable(v: str) -> str:
    v = v if _printable_ascii(v) else v.encode("ascii", "backslashreplace").decode()
    return v[:80] + ("..." if len(v) > 80 else "")


def _show(v: str) -> str:
    return repr(_printable(v))
