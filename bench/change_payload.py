"""The iptables-restore input of one endpoint change, rendered by kproxy's own code: what the
daemon writes when Service svc0's first endpoint moves to another address, and the input that
moves it back. The process benchmark times the kernel alone loading these (the floor of the
network-programming latency), in a namespace that holds the text `kproxy sync` wrote.

Run as its own process so that a large cluster's render does not stay in the benchmark's heap:

    python bench/change_payload.py SERVICES ENDPOINTS   # prints {"forward": ..., "back": ...}
"""

from __future__ import annotations

import json
import sys

from cluster import NODE, objects, service_obj, slice_obj

CHANGED_IP = "10.250.0.1"


def payloads(services: int, per_service: int) -> dict[str, str]:
    from kproxy.config import ProxyConfig
    from kproxy.model import IPFamily
    from kproxy.proxier.iptables import render as ipt
    from kproxy.state import build_state
    from kproxy.view import family_view, node_context

    state, _ = build_state(objects(services, per_service))
    ctx = node_context(ProxyConfig(node_name=NODE), IPFamily.V4, None, ("127.0.0.1",))
    view = family_view(state, IPFamily.V4)
    before = ipt.render(view.ports, view.endpoints, ctx)
    one, _ = build_state([service_obj(0), slice_obj(0, per_service, first=CHANGED_IP)])
    changed = family_view(one, IPFamily.V4).endpoints
    moved = {**view.endpoints, **changed}
    after = ipt.render(view.ports, moved, ctx, previous=before, changed=set(changed))
    back = ipt.render(view.ports, view.endpoints, ctx, previous=after, changed=set(changed))

    def jumps(rs: ipt.Ruleset) -> dict[str, set[tuple[str, str]]]:
        return {t: {(b, tg) for (tb, b, _, tg, _) in rs.jumps if tb == t} for t in ("nat", "filter")}

    return {
        "forward": ipt.plan(after, before.tables, None, jumps(before)).text,
        "back": ipt.plan(back, after.tables, None, jumps(after)).text,
    }


if __name__ == "__main__":
    print(json.dumps(payloads(int(sys.argv[1]), int(sys.argv[2]))))
