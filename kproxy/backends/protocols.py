"""What the proxiers and the daemon need of each kernel facility: one small Protocol each.

Each has one real implementation in this package and one fake in `kproxy.testing` that refuses
what the kernel would refuse; the proxiers are typed by these, so either can be handed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kproxy.model import Flow, IPFamily
from kproxy.model import Protocol as L4

if TYPE_CHECKING:
    from kproxy.backends.iptables import SavedState
    from kproxy.backends.nftnl import TableProbe


@runtime_checkable
class IptablesBackend(Protocol):
    """One family of one iptables backend: `iptables-save` for names, counts and jumps, and
    `iptables-restore --noflush` transactions (kproxy.backends.iptables.Iptables)."""

    family: IPFamily
    variant: str

    def save(self, tables: tuple[str, ...] = ..., prefixes: tuple[str, ...] = ...) -> SavedState: ...

    def restore(self, text: str) -> None: ...


@runtime_checkable
class NftablesBackend(Protocol):
    """nft transactions (kproxy.backends.nftables.Nft): `apply` runs one script as one atomic
    transaction or raises BackendError naming the failing line; `delete_table` removes a table
    and says whether there was one. Small on purpose, so `nft -f` can be swapped for
    libnftables or netlink batches."""

    def apply(self, script: str) -> None: ...

    def delete_table(self, family: str, name: str) -> bool: ...

    def generation(self) -> int:
        """The kernel's ruleset generation: it moves on every transaction committed by anyone."""
        ...

    def probe(self, family: str, table: str, sets: Iterable[str]) -> TableProbe:
        """Counts of what `table` holds (kproxy.backends.nftnl), for the drift check."""
        ...


@runtime_checkable
class ConntrackBackend(Protocol):
    """One family's conntrack table (kproxy.backends.conntrack.Conntrack)."""

    def list(self) -> list[Flow]:
        """The UDP flows (the only ones kproxy ever deletes)."""
        ...

    def delete(self, flows: Iterable[Flow]) -> int: ...


@runtime_checkable
class IpsetBackend(Protocol):
    """`ipset save` of the sets a predicate owns, `ipset restore` input, `ipset destroy`
    (kproxy.backends.ipset.Ipset)."""

    def save(self, owned: Callable[[str], bool]) -> dict[str, Any]: ...

    def restore(self, text: str) -> None: ...

    def destroy(self, names: list[str]) -> None: ...


@runtime_checkable
class IpvsBackend(Protocol):
    """The IPVS table over generic netlink (kproxy.backends.ipvs.Ipvs); entries as it reads them."""

    def ensure_loaded(self) -> None: ...

    def services(self, family: IPFamily | None = None) -> list[Any]: ...

    def dests(self, protocol: L4, ip: str, port: int) -> list[Any]: ...

    def add_service(self, protocol: L4, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None: ...

    def update_service(self, protocol: L4, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None: ...

    def delete_service(self, protocol: L4, ip: str, port: int) -> None: ...

    def add_dest(self, protocol: L4, ip: str, port: int, rip: str, rport: int, weight: int = 1) -> None: ...

    def update_dest(self, protocol: L4, ip: str, port: int, rip: str, rport: int, weight: int) -> None: ...

    def delete_dest(self, protocol: L4, ip: str, port: int, rip: str, rport: int) -> None: ...

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceBackend(Protocol):
    """The dummy device that holds the IPVS mode's VIPs (kproxy.backends.dummy.DummyDevice)."""

    def exists(self) -> bool: ...

    def ensure(self) -> bool: ...

    def delete(self) -> bool: ...

    def addresses(self, family: IPFamily | None = None) -> set[str]: ...

    def add_addresses(self, ips: list[str]) -> None: ...

    def remove_addresses(self, ips: list[str]) -> None: ...
