"""Render a cluster state for one family and node, as `kproxy sync` would, without a kernel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kproxy.config import ProxyConfig, validate
from kproxy.model import IPFamily
from kproxy.node import NodeContext
from kproxy.proxier.iptables import render as ipt
from kproxy.proxier.iptables.trace import Tracer
from kproxy.state import build_state
from kproxy.view import family_view, node_context


def render_objects(
    objects: Iterable[Mapping[str, Any]],
    cfg: ProxyConfig,
    family: IPFamily = IPFamily.V4,
    host_addrs: Iterable[str] = ("127.0.0.1", "192.168.0.2", "::1", "fd00:192:168::2"),
) -> tuple[ipt.Ruleset, NodeContext]:
    state, rejected = build_state(objects, service_proxy_name=cfg.service_proxy_name)
    if rejected:
        raise AssertionError(f"test objects rejected: {rejected}")
    ctx = node_context(validate(cfg), family, state.nodes.get(cfg.node_name), tuple(host_addrs))
    view = family_view(state, family)
    return ipt.render(view.ports, view.endpoints, ctx), ctx


def tracer_for(
    objects: Iterable[Mapping[str, Any]],
    cfg: ProxyConfig,
    family: IPFamily = IPFamily.V4,
    host_addrs: Iterable[str] = ("127.0.0.1", "192.168.0.2", "::1", "fd00:192:168::2"),
    affinity: Mapping[str, str] | None = None,
) -> Tracer:
    ruleset, ctx = render_objects(objects, cfg, family, host_addrs)
    return Tracer(ruleset, ctx.local_ips, affinity)
