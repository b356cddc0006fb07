"""The namespace's own addresses, read by kproxy's rtnetlink dump, are what `ip addr` shows."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from kproxy.backends.host import local_addresses
from kproxy.model import IPFamily
from kproxy.testing.netns import call_in

NS = f"kproxy-test-addrs-{os.getpid()}"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        _ip("link", "set", "lo", "up")
        _ip("link", "add", "a0", "type", "veth", "peer", "name", "b0")
        _ip("link", "set", "a0", "up")
        _ip("addr", "add", "10.9.0.1/24", "dev", "a0")
        _ip("addr", "add", "10.9.0.7/24", "dev", "a0")  # a secondary address
        _ip("addr", "add", "10.9.1.1", "peer", "10.9.1.2/32", "dev", "a0")  # point-to-point
        _ip("addr", "add", "fd00:9::1/64", "dev", "a0", "nodad")
        _ip("addr", "add", "fd00:9:1::1", "peer", "fd00:9:1::2/128", "dev", "a0", "nodad")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=True)


def _shown_by_ip(family: str) -> set[str]:
    links = json.loads(_ip("-j", family, "addr", "show"))
    return {a["local"] for link in links for a in link.get("addr_info", [])}


def test_every_address_of_the_namespace_and_no_peer(namespace: str) -> None:
    v4 = call_in(namespace, lambda: local_addresses(IPFamily.V4))
    v6 = call_in(namespace, lambda: local_addresses(IPFamily.V6))
    assert set(v4) == _shown_by_ip("-4") == {"127.0.0.1", "10.9.0.1", "10.9.0.7", "10.9.1.1"}
    assert set(v6) == _shown_by_ip("-6") and {"::1", "fd00:9::1", "fd00:9:1::1"} <= set(v6)
    assert "10.9.1.2" not in v4 and "fd00:9:1::2" not in v6  # the peers are not this node's
    assert v4[-1] == "127.0.0.1" and v6[-1] == "::1"  # loopback last: the node's IP is never it


def test_a_namespace_with_only_loopback(namespace: str) -> None:
    _ip("link", "del", "a0")
    assert call_in(namespace, lambda: local_addresses(IPFamily.V4)) == ("127.0.0.1",)
    assert call_in(namespace, lambda: local_addresses(IPFamily.V6)) == ("::1",)
