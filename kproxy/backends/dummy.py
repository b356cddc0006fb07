"""The dummy device that holds the IPVS mode's VIPs, and its addresses, over netlink (pyroute2).

What it guarantees:
- The device is a `dummy` link named as given (kproxy-ipvs0), left administratively down as
  upstream leaves kube-ipvs0: its addresses are local all the same (a local-table route each),
  and no prefix route or neighbour traffic comes from it.
- Addresses are host addresses (/32, /128); IPv6 ones are added with IFA_F_NODAD so they are
  usable at once on a down link, never tentative.
- One `IPRoute` socket per call, opened in the calling thread's namespace and closed at once.
- Every change is counted in `writes` by operation; a refused one raises BackendError.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import BackendError
from kproxy.model import IPFamily

IFA_F_NODAD = 0x02
_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}


def _err(e: NetlinkError) -> str:
    return errno.errorcode.get(e.code, str(e.code))


class DummyDevice:
    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: Counter[str] = Counter()

    def _index(self, ipr: IPRoute) -> int | None:
        found = ipr.link_lookup(ifname=self.name)
        return found[0] if found else None

    def exists(self) -> bool:
        try:
            with IPRoute() as ipr:
                return self._index(ipr) is not None
        except NetlinkError as e:
            raise BackendError(f"looking up {self.name} failed: {_err(e)}") from e

    def ensure(self) -> bool:
        """Create the device if it is missing; True if it was created."""
        try:
            with IPRoute() as ipr:
                if self._index(ipr) is not None:
                    return False
                ipr.link("add", ifname=self.name, kind="dummy")
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise BackendError(f"creating dummy device {self.name} failed: {_err(e)}") from e
        self.writes["add_link"] += 1
        return True

    def delete(self) -> bool:
        """Remove the device (its addresses go with it); True if there was one."""
        try:
            with IPRoute() as ipr:
                index = self._index(ipr)
                if index is None:
                    return False
                ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise BackendError(f"deleting {self.name} failed: {_err(e)}") from e
        self.writes["delete_link"] += 1
        return True

    def addresses(self, family: IPFamily | None = None) -> set[str]:
        """The device's addresses (of one family); empty when the device does not exist."""
        try:
            with IPRoute() as ipr:
                index = self._index(ipr)
                if index is None:
                    return set()
                kw = {"family": _AF[family]} if family is not None else {}
                msgs = ipr.get_addr(index=index, **kw)
        except NetlinkError as e:
            raise BackendError(f"listing addresses of {self.name} failed: {_err(e)}") from e
        return {str(m.get_attr("IFA_ADDRESS")) for m in msgs if m.get_attr("IFA_ADDRESS")}

    def add_addresses(self, ips: list[str]) -> None:
        self._change("add", ips)

    def remove_addresses(self, ips: list[str]) -> None:
        self._change("del", ips)

    def _change(self, cmd: str, ips: list[str]) -> None:
        if not ips:
            return
        try:
            with IPRoute() as ipr:
                index = self._index(ipr)
                if index is None:
                    raise BackendError(f"dummy device {self.name} does not exist")
                for ip in ips:
                    v6 = ":" in ip
                    try:
                        ipr.addr(
                            cmd,
                            index=index,
                            address=ip,
                            prefixlen=128 if v6 else 32,
                            family=socket.AF_INET6 if v6 else socket.AF_INET,
                            **({"flags": IFA_F_NODAD} if v6 and cmd == "add" else {}),
                        )
                    except NetlinkError as e:
                        # Already there (add) or already gone (del): the goal holds.
                        if (cmd == "add" and e.code == errno.EEXIST) or (
                            cmd == "del" and e.code in (errno.EADDRNOTAVAIL, errno.ENOENT)
                        ):
                            continue
                        raise BackendError(f"{cmd} address {ip} on {self.name} failed: {_err(e)}") from e
                    self.writes[f"{cmd}_address"] += 1
        except NetlinkError as e:
            raise BackendError(f"changing addresses of {self.name} failed: {_err(e)}") from e
