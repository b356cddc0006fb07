"""Names of the nftables mode's objects, all inside the table `kproxy` of each family.

Per-service names follow upstream's nftables mode: a prefix, the first 8 characters of
base32(sha256(name)), then the readable name `namespace/service/protocol/port` (and
`__ip/port` for an endpoint), so they are stable across restarts, unique, and still say what
they are in `nft list table ip kproxy`. nft allows 255 characters; upstream keeps 16 for the
prefix and truncates the rest with `...`, which the hash keeps unique.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from kproxy.model import ServicePortName

TABLE = "kproxy"
NAME_MAX = 255
_BASE_MAX = NAME_MAX + 1 - 16  # upstream's chainNameBaseLengthMax

# Base chains: "<type>-<hook>" as upstream.
FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

# Regular fixed chains.
SERVICES = "services"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_CHECK = "firewall-check"
REJECT_CHAIN = "reject-chain"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

# Sets and maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
FIREWALL_ALLOW = "firewall-allow"
HAIRPIN = "hairpin-ips"
# The shared layout (render.py): every plain Service port's endpoints, per protocol, keyed by
# VIP . port . index (or NodePort . index), and the dispatch chains holding one rule per
# endpoint count.
PROTOCOLS = ("tcp", "udp", "sctp")
SHARED_SERVICE_IPS = "shared-service-ips"
SHARED_NODEPORTS = "shared-nodeports"

SERVICE_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
AFFINITY_PREFIX = "affinity-"


def _hash_and_truncate(name: str) -> str:
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()
    out = digest[:8] + "-" + name
    return out if len(out) <= _BASE_MAX else out[: _BASE_MAX - 3] + "..."


@lru_cache(maxsize=1 << 16)
def port_base(spn: ServicePortName) -> str:
    return _hash_and_truncate(f"{spn.namespace}/{spn.name}/{spn.protocol.lowercase}/{spn.port}")


def service_chain(spn: ServicePortName) -> str:
    return SERVICE_PREFIX + port_base(spn)


def local_chain(spn: ServicePortName) -> str:
    return LOCAL_PREFIX + port_base(spn)


def external_chain(spn: ServicePortName) -> str:
    return EXTERNAL_PREFIX + port_base(spn)


def affinity_set(spn: ServicePortName, ip: str, port: int) -> str:
    # ':' is not allowed in nft names; upstream writes IPv6 endpoints with '.' instead.
    ep = f"{ip.replace(':', '.')}/{port}"
    return AFFINITY_PREFIX + _hash_and_truncate(f"{spn.namespace}/{spn.name}/{spn.protocol.lowercase}/{spn.port}__{ep}")


def backends(protocol: str) -> str:
    """`backends-tcp`: the endpoints of shared-layout Service ports of that protocol."""
    return f"backends-{protocol}"


def nodeport_backends(protocol: str) -> str:
    return f"nodeport-backends-{protocol}"


def lb_chain(count: int) -> str:
    """The chain that balances a ClusterIP over `count` endpoints of the `backends` map."""
    return f"lb-{count}"


def nodeport_lb_chain(count: int) -> str:
    return f"nodeport-lb-{count}"


def lb_keys(chain: str) -> str:
    """The set of Service keys a shared balancing chain serves: `lb-3` -> `service-ips-3`."""
    kind, _, count = chain.rpartition("-")
    return f"service-ips-{count}" if kind == "lb" else f"service-nodeports-{count}"


def is_service_object(name: str) -> bool:
    """A per-service chain or set: every one has a '/' in its name, no fixed object does."""
    return "/" in name
