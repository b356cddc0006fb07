"""In-memory fakes of the IPVS mode's backends, refusing what the kernel would refuse.

- `FakeIpvs`: the IPVS table. Adding a service or real server that exists, or touching one that
  does not, raises BackendError (EEXIST / ENOENT), as the kernel does. Connection counters are
  set by tests (`set_connections`) to play clients.
- `FakeIpset`: `ipset restore` semantics for create/add/del/swap/destroy (with -exist); swapping
  sets of different types, or destroying a set an iptables rule still names (when given a
  FakeIptables), is refused.
- `FakeDummy`: the dummy device and its addresses.
(iptables: kproxy.testing.fakeiptables.FakeIptables, shared with the iptables mode.)

Each counts its writes, for "one endpoint changed, one real server written" checks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kproxy.backends.ipset import SetEntry
from kproxy.backends.ipvs import DestEntry, ServiceEntry
from kproxy.errors import BackendError
from kproxy.model import IPFamily, Protocol, family_of
from kproxy.testing.fakeiptables import FakeIptables


@dataclass
class _Svc:
    scheduler: str
    flags: int
    timeout: int
    dests: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # -> [weight, active, inactive]


class FakeIpvs:
    def __init__(self) -> None:
        self.table: dict[tuple[Protocol, str, int], _Svc] = {}
        self.writes: Counter[str] = Counter()
        self.timeouts = (900, 120, 300)
        self.reads: Counter[str] = Counter()

    def ensure_loaded(self) -> None:
        pass

    def services(self, family: IPFamily | None = None) -> list[ServiceEntry]:
        self.reads["services"] += 1
        return [
            ServiceEntry(p, ip, port, s.scheduler, s.flags | 0x2, s.timeout)
            for (p, ip, port), s in sorted(self.table.items(), key=lambda kv: (kv[0][0].value, kv[0][1], kv[0][2]))
            if family is None or family_of(ip) == family
        ]

    def _get(self, key: tuple[Protocol, str, int]) -> _Svc:
        if key not in self.table:
            raise BackendError(f"IPVS: no service {key} (ESRCH)")
        return self.table[key]

    def dests(self, protocol: Protocol, ip: str, port: int) -> list[DestEntry]:
        self.reads["dests"] += 1
        svc = self._get((protocol, ip, port))
        return [DestEntry(rip, rport, w, 0, a, i) for (rip, rport), (w, a, i) in sorted(svc.dests.items())]

    def add_service(self, protocol: Protocol, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None:
        key = (protocol, ip, port)
        if key in self.table:
            raise BackendError(f"IPVS add_service {key} refused: EEXIST")
        self.table[key] = _Svc(scheduler, flags, timeout)
        self.writes["add_service"] += 1

    def update_service(self, protocol: Protocol, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None:
        svc = self._get((protocol, ip, port))
        svc.scheduler, svc.flags, svc.timeout = scheduler, flags, timeout
        self.writes["update_service"] += 1

    def delete_service(self, protocol: Protocol, ip: str, port: int) -> None:
        self._get((protocol, ip, port))
        del self.table[(protocol, ip, port)]
        self.writes["delete_service"] += 1

    def add_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int, weight: int = 1) -> None:
        svc = self._get((protocol, ip, port))
        if (rip, rport) in svc.dests:
            raise BackendError(f"IPVS add_dest {rip}:{rport} refused: EEXIST")
        svc.dests[(rip, rport)] = [weight, 0, 0]
        self.writes["add_dest"] += 1

    def update_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int, weight: int) -> None:
        svc = self._get((protocol, ip, port))
        if (rip, rport) not in svc.dests:
            raise BackendError(f"IPVS update_dest {rip}:{rport} refused: ENOENT")
        svc.dests[(rip, rport)][0] = weight
        self.writes["update_dest"] += 1

    def delete_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int) -> None:
        svc = self._get((protocol, ip, port))
        if (rip, rport) not in svc.dests:
            raise BackendError(f"IPVS delete_dest {rip}:{rport} refused: ENOENT")
        del svc.dests[(rip, rport)]
        self.writes["delete_dest"] += 1

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        old = self.timeouts
        self.timeouts = (tcp or old[0], tcpfin or old[1], udp or old[2])
        self.writes["set_timeouts"] += 1

    def close(self) -> None:
        pass  # no socket to close

    # ----- for tests

    def set_connections(
        self, key: tuple[Protocol, str, int], rs: tuple[str, int], active: int, inactive: int = 0
    ) -> None:
        d = self._get(key).dests[rs]
        d[1], d[2] = active, inactive

    def real_servers(self, key: tuple[Protocol, str, int]) -> dict[tuple[str, int], int]:
        return {k: v[0] for k, v in self._get(key).dests.items()}


class FakeDummy:
    def __init__(self, name: str = "kproxy-ipvs0") -> None:
        self.name = name
        self.present = False
        self.addrs: set[str] = set()
        self.writes: Counter[str] = Counter()

    def exists(self) -> bool:
        return self.present

    def ensure(self) -> bool:
        if self.present:
            return False
        self.present = True
        self.writes["add_link"] += 1
        return True

    def delete(self) -> bool:
        was = self.present
        self.present, self.addrs = False, set()
        return was

    def addresses(self, family: IPFamily | None = None) -> set[str]:
        return {a for a in self.addrs if family is None or family_of(a) == family}

    def add_addresses(self, ips: list[str]) -> None:
        if ips and not self.present:
            raise BackendError(f"dummy device {self.name} does not exist")
        for ip in ips:
            if ip not in self.addrs:
                self.addrs.add(ip)
                self.writes["add_address"] += 1

    def remove_addresses(self, ips: list[str]) -> None:
        for ip in ips:
            if ip in self.addrs:
                self.addrs.discard(ip)
                self.writes["del_address"] += 1


class FakeIpset:
    def __init__(self, iptables: FakeIptables | None = None) -> None:
        self.sets: dict[str, SetEntry] = {}
        self.iptables = iptables
        self.restores: list[str] = []

    def save(self, owned: Callable[[str], bool]) -> dict[str, SetEntry]:
        return {n: s for n, s in self.sets.items() if owned(n)}

    def restore(self, text: str) -> None:
        if not text:
            return
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            try:
                self._line(parts)
            except (BackendError, KeyError, IndexError) as e:
                raise BackendError(f"fake ipset restore: line {n} failed: {line!r}: {e}") from None
        self.restores.append(text)

    def destroy(self, names: list[str]) -> None:
        self.restore("".join(f"destroy {n}\n" for n in names))

    def _line(self, parts: list[str]) -> None:
        cmd, name = parts[0], parts[1]
        if cmd == "create":
            if name in self.sets:
                return  # -exist
            opts = dict(zip(parts[3::2], parts[4::2], strict=False))
            self.sets[name] = SetEntry(
                name, parts[2], opts.get("family", ""), int(opts.get("maxelem", 0) or 0), frozenset()
            )
        elif cmd == "add":
            s = self.sets[name]
            self.sets[name] = s._replace(entries=s.entries | {parts[2]})
        elif cmd == "del":
            s = self.sets[name]
            self.sets[name] = s._replace(entries=s.entries - {parts[2]})
        elif cmd == "swap":
            a, b = self.sets[name], self.sets[parts[2]]
            if a.type != b.type:
                raise BackendError("sets of different types cannot be swapped")
            self.sets[name], self.sets[parts[2]] = b._replace(name=name), a._replace(name=parts[2])
        elif cmd == "destroy":
            if self.iptables is not None:
                for t in self.iptables.tables.values():
                    for rules in t.values():
                        if any(f"--match-set {name} " in r for r in rules):
                            raise BackendError(f"set {name} is in use by a kernel component")
            del self.sets[name]
        else:
            raise KeyError(cmd)
