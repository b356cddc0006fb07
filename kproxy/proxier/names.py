"""Names of every kernel object kproxy owns.

Per-service names are a prefix plus a hash of the Service port (and endpoint), so they are
stable across restarts and fit the kernel's limits; cleanup finds them by prefix alone.
The hash is upstream's: the first 16 characters of base32(sha256(name + protocol [+ endpoint])).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from functools import lru_cache

from kproxy.model import ServicePortName

PREFIX = "KPROXY-"
IPTABLES_CHAIN_MAX = 28  # xt_table's XT_EXTENSION_MAXNAMELEN-1 for user chains
IPSET_NAME_MAX = 31
NFT_TABLE = "kproxy"
IPVS_DEVICE = "kproxy-ipvs0"
UPSTREAM_PREFIX = "KUBE-"

# Fixed chains, per table.
SERVICES = "KPROXY-SERVICES"
EXTERNAL_SERVICES = "KPROXY-EXTERNAL-SERVICES"
NODEPORTS = "KPROXY-NODEPORTS"
POSTROUTING = "KPROXY-POSTROUTING"
MARK_MASQ = "KPROXY-MARK-MASQ"
FORWARD = "KPROXY-FORWARD"
PROXY_FIREWALL = "KPROXY-PROXY-FIREWALL"
LOCALNET_FIREWALL = "KPROXY-FIREWALL"


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Two base32 characters per 10 bits: 16 characters are the first 80 bits of the digest.
_PAIRS = [_B32[i >> 5] + _B32[i & 31] for i in range(1024)]


def _hash(text: str) -> str:
    """First 16 characters of base32(sha256(text)), without base64's slow pure-Python encoder."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _PAIRS
    return (
        p[(n >> 70) & 1023]
        + p[(n >> 60) & 1023]
        + p[(n >> 50) & 1023]
        + p[(n >> 40) & 1023]
        + p[(n >> 30) & 1023]
        + p[(n >> 20) & 1023]
        + p[(n >> 10) & 1023]
        + p[n & 1023]
    )


def _hash_slow(text: str) -> str:
    """The definition, kept for the test that pins _hash to it."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


@lru_cache(maxsize=1 << 16)
def port_hash(spn: ServicePortName) -> str:
    return _hash(str(spn) + spn.protocol.lowercase)


def service_chain(spn: ServicePortName) -> str:
    return "KPROXY-SVC-" + port_hash(spn)


def local_chain(spn: ServicePortName) -> str:
    return "KPROXY-SVL-" + port_hash(spn)


def external_chain(spn: ServicePortName) -> str:
    return "KPROXY-EXT-" + port_hash(spn)


def firewall_chain(spn: ServicePortName) -> str:
    return "KPROXY-FW-" + port_hash(spn)


def endpoint_chain(spn: ServicePortName, endpoint_addr: str) -> str:
    return endpoint_chains(spn, (endpoint_addr,))[endpoint_addr]


def endpoint_chains(spn: ServicePortName, endpoint_addrs: Iterable[str]) -> dict[str, str]:
    """`endpoint_chain` of each address of one Service port. The Service port's part of the
    hashed text is built once, not per endpoint (100,000 times at 10,000 Services), and the
    cache is keyed by the text, whose hash a string computes once."""
    prefix = str(spn) + spn.protocol.lowercase
    return {addr: _endpoint_hash(prefix + addr) for addr in endpoint_addrs}


@lru_cache(maxsize=1 << 18)
def _endpoint_hash(text: str) -> str:
    return "KPROXY-SEP-" + _hash(text)


# The hostPort component's chains (kproxy/hostport/rules.py OWN_PREFIXES): not a mode's, so
# they stay when a mode leaves a node.
HOSTPORT_PREFIXES = ("KPROXY-HOSTPORT-", "KPROXY-HP-")


def is_mode_chain(name: str) -> bool:
    """A chain a proxy mode wrote (the daemon's canary included), not the hostPort component's."""
    return name.startswith(PREFIX) and not name.startswith(HOSTPORT_PREFIXES)


def is_owned(name: str) -> bool:
    """Anything kproxy created (cleanup's test): every KPROXY- chain, whichever part made it."""
    return name.startswith(PREFIX)


SERVICE_FIXED_CHAINS = frozenset(
    {SERVICES, EXTERNAL_SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, FORWARD, PROXY_FIREWALL, LOCALNET_FIREWALL}
)
SERVICE_CHAIN_PREFIXES = ("KPROXY-SVC-", "KPROXY-SVL-", "KPROXY-EXT-", "KPROXY-FW-", "KPROXY-SEP-")


def is_service_chain(name: str) -> bool:
    """A chain the iptables Service proxier owns and may garbage-collect. hostPort chains, the
    canary and the IPVS mode's chains share the KPROXY- prefix but belong to other writers."""
    return name in SERVICE_FIXED_CHAINS or name.startswith(SERVICE_CHAIN_PREFIXES)
