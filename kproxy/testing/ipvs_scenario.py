"""Render a cluster state in the IPVS mode for one family and node, as `kproxy sync --mode ipvs`
would, without a kernel; and a tracer over it (the IPVS twin of kproxy.testing.scenario)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kproxy.config import IpvsConfig, ProxyConfig, validate, validate_ipvs_config
from kproxy.model import IPFamily
from kproxy.node import NodeContext
from kproxy.proxier.ipvs import render as pv
from kproxy.proxier.ipvs.trace import IpvsTracer
from kproxy.state import build_state
from kproxy.view import family_view, node_context

HOST_ADDRS = ("127.0.0.1", "192.168.0.2", "::1", "fd00:192:168::2")


def render_ipvs_objects(
    objects: Iterable[Mapping[str, Any]],
    cfg: ProxyConfig,
    ipvs_cfg: IpvsConfig = pv.DEFAULT_CONFIG,
    family: IPFamily = IPFamily.V4,
    host_addrs: Iterable[str] = HOST_ADDRS,
) -> tuple[pv.IpvsState, NodeContext]:
    state, rejected = build_state(objects, service_proxy_name=cfg.service_proxy_name)
    if rejected:
        raise AssertionError(f"test objects rejected: {rejected}")
    ctx = node_context(validate(cfg), family, state.nodes.get(cfg.node_name), tuple(host_addrs))
    view = family_view(state, family)
    return pv.render(view.ports, view.endpoints, ctx, validate_ipvs_config(ipvs_cfg)), ctx


def ipvs_tracer_for(
    objects: Iterable[Mapping[str, Any]],
    cfg: ProxyConfig,
    ipvs_cfg: IpvsConfig = pv.DEFAULT_CONFIG,
    family: IPFamily = IPFamily.V4,
    host_addrs: Iterable[str] = HOST_ADDRS,
    affinity: Mapping[tuple[str, str], str] | None = None,
) -> IpvsTracer:
    desired, ctx = render_ipvs_objects(objects, cfg, ipvs_cfg, family, host_addrs)
    return IpvsTracer(desired, ctx.local_ips, affinity)
