"""Apply a rendered nginx configuration: write on change, ``nginx -t``, atomic swap, reload.

`Reloader.apply(table)` renders the routing table and makes nginx serve it. Guarantees:

- **Write only on change.** When the rendered text equals what nginx is running (and nginx
  runs), nothing is written, tested or signalled. A text nginx rejected before is not tested
  again until it changes (the failure is reported once, not every sync).
- **Files first, with their modes.** Every file the configuration references is written before
  the configuration is tested: by content (a changed Secret has a new file name, so the running
  configuration keeps reading its own files), atomically (a temporary file in the same
  directory, created with its final restrictive mode, renamed into place), TLS certificates and
  keys 0600 (only the master, running as root, reads them), htpasswd files 0640 with the
  workers' group (workers read them per request). Files no referenced configuration uses any
  more are deleted once nginx has taken the new one.
- **Checked, then swapped atomically.** The candidate is written beside ``nginx.conf`` and
  checked with ``nginx -t`` against the same prefix; only an accepted candidate is renamed over
  ``nginx.conf`` (rename(2) is atomic), so ``nginx.conf`` always holds a configuration nginx
  accepted, and a restart of nginx never picks up a rejected one.
- **Reload, or start.** A running master gets SIGHUP and the reload counts only when new workers
  appear; old workers finish their in-flight requests. If the master does not take it (an
  address it cannot bind), the previous ``nginx.conf`` is put back. With no master running,
  nginx is started.
- **One bad Secret does not block everyone.** When ``nginx -t`` names a certificate or key file
  (a key that does not match its certificate, a certificate OpenSSL cannot load), the hosts using
  that Secret lose their certificate (`ServerTLS.cert` = None: they fail closed on HTTPS, their
  HTTP redirects stay), the Ingress gets a reason, and the rest is rendered and checked again.
- **A rejected configuration is reported** — log event ``nginx_config_rejected`` with nginx's
  message and the numbered lines around the failing one, ``kproxy_ingress_config_last_reload_successful``
  0, ``kproxy_ingress_reload_failures_total`` +1, and `ApplyResult.involved` naming the
  Ingresses whose server block holds the failing line (for Events) — and the last good
  configuration keeps serving. The rejected text is kept as ``nginx.conf.rejected``.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from kproxy.backends.nginx import NginxProcess
from kproxy.errors import BackendError
from kproxy.ingress.metrics import IngressMetrics
from kproxy.ingress.model import IngressRef, Reason, RoutingTable, Server
from kproxy.ingress.nginx import NginxConfig, NginxOptions, render
from kproxy.model import Endpoint, ServicePortName

log = structlog.get_logger(__name__)

_OWN_FILE = re.compile(r"(tls_.+\.(crt|key)|auth_.+\.htpasswd)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
_AT_LINE = re.compile(r" in (/\S+?):(\d+)")


@dataclass(frozen=True, slots=True)
class RejectedTLS:
    host: str
    secret: str  # namespace/name
    ingress: IngressRef
    error: str

    def __str__(self) -> str:
        return f"host {self.host}: Secret {self.secret}: nginx rejected its certificate or key: {self.error}"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    ok: bool  # nginx serves this configuration (possibly without some rejected certificates)
    changed: bool  # a new configuration was loaded (reload or start)
    config: NginxConfig
    table: RoutingTable  # the table actually rendered (rejected certificates dropped)
    rejected_tls: tuple[RejectedTLS, ...] = ()
    error: str = ""
    involved: tuple[IngressRef, ...] = ()
    started: bool = False


def worker_group(options: NginxOptions) -> str | None:
    """The group nginx workers run as: the configured one, else nginx's default (nogroup) when
    the master runs as root; None when not root (workers keep our own group)."""
    if options.user is not None:
        return options.user[1]
    if os.geteuid() != 0:
        return None
    for g in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            grp.getgrnam(g)
            return g
    return None


def _file_mode(path: str, mode: int) -> int:
    return 0o600 if path.endswith((".crt", ".key")) else mode


def write_files(cfg: NginxConfig, *, group: str | None = None, secure_certs: bool = True) -> list[str]:
    """Write the files `cfg` references (see the module docstring); returns the paths written.

    `group`: chgrp for the files workers read (htpasswd). Parent directories are created 0711
    (traversable, not listable) when missing.
    """
    gid = grp.getgrnam(group).gr_gid if group else -1
    written = []
    for path, spec in cfg.files:
        mode = _file_mode(path, spec.mode) if secure_certs else spec.mode
        want_gid = gid if path.endswith(".htpasswd") else -1
        p = Path(path)
        if _same_file(p, spec.content, mode, want_gid):
            continue
        p.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o600)
        try:
            os.fchmod(fd, mode)
            if want_gid >= 0:
                os.fchown(fd, -1, want_gid)
            view = memoryview(spec.content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, p)
        written.append(path)
    return written


def _same_file(p: Path, content: bytes, mode: int, gid: int) -> bool:
    try:
        st = p.stat()
        if stat.S_IMODE(st.st_mode) != mode or (gid >= 0 and st.st_gid != gid) or st.st_size != len(content):
            return False
        return p.read_bytes() == content
    except OSError:
        return False


def prune_files(directory: str, keep: Iterable[str]) -> list[str]:
    """Delete our files (tls_*.crt|key, auth_*.htpasswd) in `directory` that are not in `keep`."""
    keep = set(keep)
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for e in entries:
        if e.is_file(follow_symlinks=False) and _OWN_FILE.fullmatch(e.name) and e.path not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
            removed.append(e.path)
    return removed


def config_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 12


class Reloader:
    """Drives one nginx from routing tables; not thread-safe (one sync thread calls `apply`)."""

    def __init__(
        self,
        nginx: NginxProcess,
        options: NginxOptions,
        *,
        conf_path: str,
        metrics: IngressMetrics | None = None,
        file_group: str | None = None,
        reload_timeout: float = 10.0,
        render_fn: Callable[..., NginxConfig] = render,
    ) -> None:
        self.nginx = nginx
        self._render = render_fn
        self.options = options
        self.conf = Path(conf_path)
        self.candidate = self.conf.with_name(self.conf.name + ".candidate")
        self.previous = self.conf.with_name(self.conf.name + ".previous")
        self.rejected = self.conf.with_name(self.conf.name + ".rejected")
        self.metrics = metrics if metrics is not None else IngressMetrics()
        self.file_group = file_group if file_group is not None else worker_group(options)
        self.reload_timeout = reload_timeout
        self._good_text: str | None = None
        self._good_files: set[str] = set()
        self._failed: tuple[str, ApplyResult] | None = None

    @property
    def running_text(self) -> str | None:
        """The configuration nginx runs (as last applied), or None."""
        return self._good_text

    def apply(
        self, table: RoutingTable, endpoints: Mapping[ServicePortName, Sequence[Endpoint]] | None = None
    ) -> ApplyResult:
        cfg = self._render(table, self.options, endpoints)
        running = self.nginx.running()
        if running and cfg.text == self._good_text:
            return ApplyResult(ok=True, changed=False, config=cfg, table=table)
        if running and self._failed is not None and self._failed[0] == cfg.text:
            return self._failed[1]
        first_text = cfg.text
        self._prepare_dirs()

        rejected: list[RejectedTLS] = []
        while True:
            try:
                write_files(cfg, group=self.file_group)
                _write_text(self.candidate, cfg.text)
                accepted, message = self.nginx.test(str(self.candidate))
            except (OSError, BackendError) as e:  # a full disk, no nginx binary: retried later
                return self._rejected(first_text, cfg, table, str(e), tuple(rejected), stage="prepare")
            if accepted:
                break
            bad = _tls_rejections(message, cfg, table)
            if not bad:
                return self._rejected(first_text, cfg, table, message, tuple(rejected), stage="check")
            rejected += bad
            table = _drop_tls(table, bad)
            cfg = self._render(table, self.options, endpoints)

        # Accepted: swap it in atomically, keeping the previous one to restore if nginx balks.
        had_previous = self.conf.exists()
        started = False
        try:
            if had_previous:
                with contextlib.suppress(FileNotFoundError):
                    self.previous.unlink()
                os.link(self.conf, self.previous)
            os.replace(self.candidate, self.conf)
            if self.nginx.running():
                self.nginx.reload(self.reload_timeout)
            else:
                self.nginx.start()
                started = True
        except (BackendError, OSError) as e:
            if had_previous and self._good_text is not None and self.previous.exists():
                os.replace(self.previous, self.conf)
            return self._rejected(first_text, cfg, table, str(e), tuple(rejected), stage="reload")
        self._good_text = cfg.text
        self._good_files = {p for p, _ in cfg.files}
        self._failed = None
        removed = prune_files(self.options.cert_dir, self._good_files)
        m = self.metrics
        m.last_reload_successful.set(1)
        m.last_reload_success_timestamp.set_to_current_time()
        m.reloads.inc()
        m.config_hash.set(config_hash(cfg.text))
        m.tls_rejected.set(len(rejected))
        log.info(
            "nginx_config_applied",
            action="start" if started else "reload",
            servers=len(table.servers),
            files=len(cfg.files),
            files_removed=len(removed),
            tls_rejected=len(rejected),
            config_hash=f"{config_hash(cfg.text):x}",
        )
        for r in rejected:
            log.warning("nginx_tls_rejected", host=r.host, secret=r.secret, ingress=str(r.ingress), error=r.error)
        return ApplyResult(
            ok=True, changed=True, config=cfg, table=table, rejected_tls=tuple(rejected), started=started
        )

    def _prepare_dirs(self) -> None:
        run_dir = Path(self.options.run_dir)
        run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        Path(self.options.cert_dir).mkdir(mode=0o711, parents=True, exist_ok=True)
        self.conf.parent.mkdir(mode=0o755, parents=True, exist_ok=True)

    def _rejected(
        self,
        first_text: str,
        cfg: NginxConfig,
        table: RoutingTable,
        message: str,
        rejected_tls: tuple[RejectedTLS, ...],
        *,
        stage: str,
    ) -> ApplyResult:
        line = _failing_line(message)
        context = _context(cfg.text, line) if line else ""
        involved = _involved(cfg.text, line, table) if line else ()
        _write_text(self.rejected, cfg.text)
        with contextlib.suppress(FileNotFoundError):
            self.candidate.unlink()
        # Files only the rejected candidate used go; the running configuration's stay.
        prune_files(self.options.cert_dir, self._good_files)
        self.metrics.last_reload_successful.set(0)
        self.metrics.reload_failures.inc()
        log.error(
            "nginx_config_rejected",
            stage=stage,
            error=message,
            line=line,
            context=context,
            ingresses=[str(r) for r in involved],
            keeps_serving="previous configuration" if self._good_text is not None else "nothing (not started)",
        )
        result = ApplyResult(
            ok=False,
            changed=False,
            config=cfg,
            table=table,
            rejected_tls=rejected_tls,
            error=message,
            involved=involved,
        )
        # A text nginx -t rejected is not checked again until it changes; anything else (a reload
        # nginx did not take, a failed write) is retried: its cause may go away.
        self._failed = (first_text, result) if stage == "check" else None
        return result

    def stop(self, timeout: float = 10.0) -> None:
        self.nginx.stop(timeout)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _tls_rejections(message: str, cfg: NginxConfig, table: RoutingTable) -> list[RejectedTLS]:
    """The hosts whose certificate or key file nginx's message names."""
    files = cfg.file_map
    named = [p for p in _QUOTED_PATH.findall(message) if p in files and p.endswith((".crt", ".key"))]
    if not named:
        return []
    contents = {files[p].content for p in named}
    short = _short_error(message)
    out = []
    for s in table.servers:
        cert = s.tls.cert if s.tls is not None else None
        if cert is None or s.tls is None:
            continue
        if cert.cert_pem.encode() in contents or cert.key_pem.encode() in contents:
            out.append(RejectedTLS(s.host, f"{s.tls.secret_namespace}/{s.tls.secret_name}", s.tls.ingress, short))
    return out


def _drop_tls(table: RoutingTable, bad: Iterable[RejectedTLS]) -> RoutingTable:
    by_host = {b.host: b for b in bad}
    servers: list[Server] = []
    reasons = list(table.reasons)
    for s in table.servers:
        b = by_host.get(s.host)
        if b is None or s.tls is None:
            servers.append(s)
            continue
        msg = f"Secret {b.secret}: nginx rejected the certificate or key ({b.error})"
        servers.append(replace(s, tls=replace(s.tls, cert=None, reason=msg)))
        reasons.append(Reason(str(b.ingress), "spec.tls", msg + f"; HTTPS for {s.host} fails closed"))
    return replace(
        table, servers=tuple(servers), reasons=tuple(sorted(set(reasons), key=lambda r: (r.ref, r.field, r.message)))
    )


def _short_error(message: str) -> str:
    first = message.splitlines()[0] if message else ""
    m = re.search(r"\(SSL: ([^)]*)\)", first)
    text = m.group(1) if m else first
    return text[:300]


def _failing_line(message: str) -> int | None:
    m = _AT_LINE.search(message)
    return int(m.group(2)) if m else None


def _context(text: str, n: int, around: int = 3) -> str:
    lines = text.splitlines()
    lo, hi = max(1, n - around), min(len(lines), n + around)
    return "\n".join(f"{'>' if i == n else ' '}{i:6d}  {lines[i - 1]}" for i in range(lo, hi + 1))


def _involved(text: str, line: int, table: RoutingTable) -> tuple[IngressRef, ...]:
    """The Ingresses of the server block holding `line`: the renderer writes one ``server {``
    block per `Server`, in table order, so the n-th block is ``table.servers[n]``."""
    index = -1
    for i, raw in enumerate(text.splitlines()[:line], start=1):
        if raw.strip() == "server {":
            index += 1
        if i == line:
            break
    if index < 0 or index >= len(table.servers):
        return ()
    s = table.servers[index]
    refs = {r.ingress for r in s.routes}
    refs |= {r.canary.ingress for r in s.routes if r.canary is not None}
    if s.fallback is not None:
        refs.add(s.fallback.ingress)
    if s.tls is not None:
        refs.add(s.tls.ingress)
    return tuple(sorted(refs))
