"""Drives the IPVS mode of one IP family: render, read the kernel back, plan, apply the difference.

What a sync guarantees:
- The IPVS table is read back over netlink every sync (the service list always; the real servers
  of every VS on a full sync, afterwards of the VSs whose desired state changed or that hold
  draining real servers) and only the difference is written: one endpoint change is one real
  server written, nothing else in IPVS.
- ipsets are read back (`ipset save`) when they should change (always on a full sync) and changed
  in place, or rebuilt and swapped; iptables is written only when its rules changed (the iptables mode's rule: chains are never read back for
  comparison, only their names), in one restore transaction over mangle, filter and nat.
- Order, so that no packet meets a half-built state: ipset additions; IPVS services and real
  servers; dummy addresses bound; iptables; stale addresses unbound; stale services deleted;
  stale sets destroyed.
- Graceful termination, as upstream: a TCP real server leaving a VS gets weight 0 and is deleted
  once its ActiveConn + InActConn reach 0, checked by later syncs and by `drain()` (cheap: only
  the draining VSs are read); UDP and SCTP real servers go at once.
- Stale UDP conntrack flows are not the proxier's: the command or the daemon deletes them after
  the sync, as in the iptables mode (kproxy/conntrack.py, `clean_stale_udp`).
- Any backend failure forgets what was applied, so the next sync is full, and is raised.

The backends are used from the calling thread only (pyroute2: one socket per thread, opened in
the namespace of that thread).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kproxy.backends import ipvs as ipvs_backend
from kproxy.backends.host import set_sysctl
from kproxy.backends.protocols import DeviceBackend, IpsetBackend, IptablesBackend, IpvsBackend
from kproxy.config import IpvsConfig, validate_ipvs_config
from kproxy.errors import BackendError
from kproxy.model import IPFamily
from kproxy.node import NodeContext
from kproxy.proxier import names
from kproxy.proxier.iptables import render as ipt
from kproxy.proxier.ipvs import plan as pvp
from kproxy.proxier.ipvs import render as pv
from kproxy.proxier.result import SyncResult as BaseResult
from kproxy.view import FamilyView, Repair

# conn_reuse_mode=0 works around 1 s stalls on reused ports (#81775) on kernels before the fix
# (#93297); from this version on it is left alone, as upstream does.
CONN_REUSE_FIXED_KERNEL = (5, 9)
CONN_REUSE_MIN_KERNEL = (4, 1)


@dataclass
class IpvsSyncResult(BaseResult):
    virtual_servers: int = 0
    real_servers: int = 0
    ipvs_ops: tuple[str, ...] = ()
    addresses_added: int = 0
    addresses_removed: int = 0
    ipset_lines: int = 0
    ipsets_rebuilt: tuple[str, ...] = ()
    chains_written: dict[str, int] = field(default_factory=dict)
    chains_deleted: dict[str, int] = field(default_factory=dict)
    draining: int = 0

    def log_fields(self) -> dict[str, int]:
        """What this sync wrote, for the daemon's ``sync_complete`` line."""
        return {
            "written": sum(self.chains_written.values()),
            "deleted": sum(self.chains_deleted.values()),
            "ipvs_writes": len(self.ipvs_ops),
            "addresses_added": self.addresses_added,
            "addresses_removed": self.addresses_removed,
            "ipset_lines": self.ipset_lines,
            "draining": self.draining,
        }

    def written_summary(self) -> str:
        return (
            f"{self.virtual_servers} virtual servers, {self.real_servers} real servers; "
            f"{len(self.ipvs_ops)} IPVS writes, {self.addresses_added}+/{self.addresses_removed}- addresses, "
            f"{self.ipset_lines} ipset lines, wrote {sum(self.chains_written.values())} chains, "
            f"deleted {sum(self.chains_deleted.values())}"
        )

    def notes(self) -> list[str]:
        return [f"{self.draining} real servers draining"] if self.draining else []


def kernel_state(entries: list[Any]) -> dict[pv.VSKey, pvp.KernelService]:
    return {
        (e.protocol, e.ip, e.port): pvp.KernelService(e.protocol, e.ip, e.port, e.scheduler, e.flags, e.timeout)
        for e in entries
    }


class IpvsProxier:
    def __init__(
        self,
        family: IPFamily,
        cfg: IpvsConfig,
        *,
        ipvs: IpvsBackend,
        ipset: IpsetBackend,
        iptables: IptablesBackend,
        device: DeviceBackend,
        sysctl: Callable[[str, str], bool] = set_sysctl,
        kernel: tuple[int, int] | None = None,
    ) -> None:
        self.family = family
        self.cfg = validate_ipvs_config(cfg)
        self.ipvs = ipvs
        self.ipset = ipset
        self.iptables = iptables
        self.device = device
        self._sysctl = sysctl
        self._kernel = kernel
        self._set_up = False
        self._last: pv.IpvsState | None = None
        self._applied_tables: dict[str, dict[str, ipt.Held]] | None = None
        self._draining: set[tuple[pv.VSKey, tuple[str, int]]] = set()

    # ----- set-up

    def force_full(self) -> None:
        self._last = None
        self._applied_tables = None

    def setup(self) -> None:
        """Sysctls and IPVS timeouts as upstream, and the dummy device; once per proxier."""
        if self._set_up:
            return
        kernel = self._kernel or ipvs_backend.kernel_version()
        self.ipvs.ensure_loaded()  # the vs/ sysctls appear with the module
        self._sysctl("net/ipv4/vs/conntrack", "1")
        if CONN_REUSE_MIN_KERNEL <= kernel < CONN_REUSE_FIXED_KERNEL:
            self._sysctl("net/ipv4/vs/conn_reuse_mode", "0")
        # A connection to a deleted real server is expired at its next packet (the client
        # reconnects elsewhere) rather than black-holed; persistence templates of a quiesced
        # (weight 0) real server expire too, so affinity does not pin clients to it (#71834).
        self._sysctl("net/ipv4/vs/expire_nodest_conn", "1")
        self._sysctl("net/ipv4/vs/expire_quiescent_template", "1")
        self._sysctl("net/ipv4/ip_forward", "1")
        if self.cfg.strict_arp:
            # VIPs are local addresses: without this the node answers ARP for every one of them
            # on every link (MetalLB's L2 mode needs it off).
            self._sysctl("net/ipv4/conf/all/arp_ignore", "1")
            self._sysctl("net/ipv4/conf/all/arp_announce", "2")
        c = self.cfg
        if c.tcp_timeout or c.tcp_fin_timeout or c.udp_timeout:
            self.ipvs.set_timeouts(int(c.tcp_timeout), int(c.tcp_fin_timeout), int(c.udp_timeout))
        self.device.ensure()
        self._set_up = True

    # ----- sync

    def render(self, view: FamilyView, ctx: NodeContext) -> pv.IpvsState:
        return pv.render(view.ports, view.endpoints, ctx, self.cfg)

    def sync(
        self, view: FamilyView, ctx: NodeContext, *, full: bool = False, dry_run: bool = False, verify: bool = True
    ) -> IpvsSyncResult:
        """One sync; see the module docstring. `verify` also reads the iptables listing back when
        the rules did not change, to repair drift there (a full sync always does)."""
        full = full or self._last is None
        t0 = time.perf_counter()
        try:
            bound = self.device.addresses(self.family)
        except BackendError:
            if not dry_run:
                raise
            bound = set()
        ctx = pv.without_addresses(ctx, bound)
        desired = self.render(view, ctx)
        t1 = time.perf_counter()
        result = IpvsSyncResult(
            family=int(self.family),
            full=full,
            services=len(view.ports),
            endpoints=sum(len(e) for e in view.endpoints.values()),
            virtual_servers=len(desired.virtual_servers),
            real_servers=sum(len(v.real_servers) for v in desired.virtual_servers.values()),
            render_seconds=t1 - t0,
            no_local_internal=desired.no_local_internal,
            no_local_external=desired.no_local_external,
        )
        if dry_run:
            result.payload = str(desired)
            return result
        try:
            self._apply(desired, bound, full, verify, result)
        except (BackendError, ValueError) as e:
            self.force_full()
            if isinstance(e, ValueError):
                raise BackendError(str(e)) from e
            raise
        result.apply_seconds = time.perf_counter() - t1 - result.plan_seconds
        result.objects = {"virtual_server": result.virtual_servers, "real_server": result.real_servers}
        return result

    def _read_ipvs(self, desired: pv.IpvsState, full: bool) -> dict[pv.VSKey, pvp.KernelService]:
        current = kernel_state(self.ipvs.services(self.family))
        last = self._last.virtual_servers if self._last is not None and not full else {}
        draining = {k for k, _ in self._draining}
        for key, ks in list(current.items()):
            want = desired.virtual_servers.get(key)
            if want is None:
                continue  # deleted, or not ours: its real servers do not matter
            if full or key in draining or last.get(key) != want:
                dests = tuple(
                    pvp.KernelDest(d.ip, d.port, d.weight, d.fwd, d.active, d.inactive) for d in self.ipvs.dests(*key)
                )
                current[key] = dataclasses.replace(ks, dests=dests)
        return current

    def _owned(self, keys: list[pv.VSKey]) -> list[pv.VSKey]:
        excl = self.cfg.exclude_cidrs
        return [k for k in keys if not (excl and pvp.in_cidrs(k[1], excl))]

    def _apply(self, desired: pv.IpvsState, bound: set[str], full: bool, verify: bool, result: IpvsSyncResult) -> None:
        t0 = time.perf_counter()
        self.setup()
        current = self._read_ipvs(desired, full)
        plan = pvp.ipvs_plan(desired.virtual_servers, current, self._owned(list(current)))
        existing_sets: dict[str, pvp.KernelSet] | None = None
        if not full and self._last is not None and self._last.ipsets == desired.ipsets:
            # Unchanged since the last sync wrote them: not read back (a full sync always is).
            set_plan = pvp.IpsetPlan("", (), 0, 0, ())
        else:
            existing_sets = {
                n: pvp.KernelSet(
                    n, s.type, s.family, s.maxelem, frozenset(pv.canonical_entry(s.type, e) for e in s.entries)
                )
                for n, s in self.ipset.save(lambda n: pv.owns_set(n, self.family)).items()
            }
            set_plan = pvp.ipset_plan(desired.ipsets, existing_sets, self.family)
        repairs: tuple[Repair, ...] = ()
        if self._last is not None:
            repairs = pvp.ipvs_drift(self._last, desired, current, existing_sets)
        tables: dict[str, dict[str, ipt.Held]] = {t: dict(c) for t, c in desired.iptables.tables.items()}
        restore = None
        if full or verify or self._applied_tables != tables:
            saved = self.iptables.save(pv.TABLES, prefixes=(names.PREFIX,))
            # Even a full sync (which reads everything back) writes only what changed or drifted.
            applied = self._applied_tables
            if applied is not None and self._last is not None:
                last_jumps = ((t, b, target) for t, b, _, target, _ in self._last.iptables.jumps)
                present = pv.present_jumps(saved.jump_rules)
                rewrite, found = ipt.drift(applied, saved.chains, saved.rule_counts, last_jumps, present)
                applied, repairs = ipt.without(applied, rewrite), repairs + found
            restore = pv.iptables_plan(desired.iptables, applied, saved.chains, saved.jump_rules)
        # Everything above read the kernel back and worked out the difference; below writes it.
        result.plan_seconds = time.perf_counter() - t0

        self.ipset.restore(set_plan.text)
        self.device.ensure()
        for op in plan.early:
            self._do(op)
        add = pv.sorted_ips(desired.addresses - bound)
        self.device.add_addresses(add)
        if restore is not None and restore.text:
            self.iptables.restore(restore.text)
        remove = pv.sorted_ips(bound - desired.addresses)
        self.device.remove_addresses(remove)
        for op in plan.late:
            self._do(op)
        if set_plan.destroy:
            self.ipset.destroy(list(set_plan.destroy))

        self._last = desired
        self._applied_tables = tables
        self._draining = set(plan.draining)
        result.ipvs_ops = tuple(str(op) for op in plan.ops)
        result.addresses_added, result.addresses_removed = len(add), len(remove)
        result.ipset_lines = set_plan.text.count("\n") + len(set_plan.destroy)
        result.ipsets_rebuilt = set_plan.rebuilt
        if restore is not None and restore.text:  # a verifying read that found nothing wrote nothing
            result.chains_written, result.chains_deleted = restore.written, restore.deleted
        result.draining = len(self._draining)
        result.repairs = repairs

    def _do(self, op: pvp.IpvsOp) -> None:
        vs, rs = op.vs, op.rs
        if op.op == "add_service":
            self.ipvs.add_service(vs.protocol, vs.ip, vs.port, vs.scheduler, vs.flags, vs.timeout)
        elif op.op == "update_service":
            self.ipvs.update_service(vs.protocol, vs.ip, vs.port, vs.scheduler, vs.flags, vs.timeout)
        elif op.op == "delete_service":
            self.ipvs.delete_service(vs.protocol, vs.ip, vs.port)
        elif rs is None:
            raise AssertionError(f"{op.op} without a real server")
        elif op.op == "add_dest":
            self.ipvs.add_dest(vs.protocol, vs.ip, vs.port, rs.ip, rs.port, rs.weight)
        elif op.op == "update_dest":
            self.ipvs.update_dest(vs.protocol, vs.ip, vs.port, rs.ip, rs.port, rs.weight)
        elif op.op == "delete_dest":
            self.ipvs.delete_dest(vs.protocol, vs.ip, vs.port, rs.ip, rs.port)
        else:
            raise AssertionError(f"unknown IPVS operation {op.op}")

    # ----- graceful termination

    @property
    def state(self) -> pv.IpvsState | None:
        """What the last successful sync programmed (None before, or after a failure)."""
        return self._last

    @property
    def draining(self) -> frozenset[tuple[pv.VSKey, tuple[str, int]]]:
        return frozenset(self._draining)

    def drain(self) -> int:
        """Delete the draining real servers whose connections have ended; how many still drain.

        Reads only the VSs that hold draining real servers, so it can run often (upstream checks
        every minute) between syncs.
        """
        if not self._draining:
            return 0
        still: set[tuple[pv.VSKey, tuple[str, int]]] = set()
        try:
            by_vs: dict[pv.VSKey, list[tuple[str, int]]] = {}
            for key, rs in self._draining:
                by_vs.setdefault(key, []).append(rs)
            for key, rss in sorted(by_vs.items(), key=lambda kv: (kv[0][0].value, kv[0][1], kv[0][2])):
                dests = {(d.ip, d.port): d for d in self.ipvs.dests(*key)}
                for rs in sorted(rss):
                    d = dests.get(rs)
                    if d is None:
                        continue
                    if d.weight != 0:
                        continue  # wanted again meanwhile: a sync set it back
                    if d.active + d.inactive == 0:
                        self.ipvs.delete_dest(key[0], key[1], key[2], rs[0], rs[1])
                    else:
                        still.add((key, rs))
        except BackendError:
            self.force_full()
            raise
        self._draining = still
        return len(still)


def real_ipvs_proxier(family: IPFamily, cfg: IpvsConfig, iptables: IptablesBackend) -> IpvsProxier:
    """An IpvsProxier over the kernel's IPVS, ipset and dummy device, with the given iptables.

    Its netlink socket opens in the first thread that syncs: use it from that thread only.
    """
    from kproxy.backends.dummy import DummyDevice
    from kproxy.backends.ipset import Ipset

    return IpvsProxier(
        family,
        cfg,
        ipvs=ipvs_backend.Ipvs(),
        ipset=Ipset(),
        iptables=iptables,
        device=DummyDevice(names.IPVS_DEVICE),
    )
