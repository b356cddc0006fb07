"""One IP family's view of the cluster state, kept up to date per changed Service.

`IncrementalView.update` gives the same `FamilyView` as `kproxy.view.family_view` over the
whole state, but recomputes only the Services named as changed (their ports, and the endpoints
folded from their EndpointSlices), so a sync after one endpoint change does not walk every
EndpointSlice of the cluster again. Pure; single-threaded (the sync thread owns it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kproxy.endpointslices import endpoints_by_port
from kproxy.model import ClusterState, Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.view import FamilyView

ServiceKey = tuple[str, str]
SliceKey = tuple[str, str]


class IncrementalView:
    def __init__(self, family: IPFamily) -> None:
        self.family = family
        self._ports: dict[ServicePortName, ServicePort] = {}
        self._endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        self._names: dict[ServiceKey, tuple[ServicePortName, ...]] = {}
        self._ready = False

    def update(
        self,
        state: ClusterState,
        changed: Iterable[ServiceKey],
        slices_by_service: Mapping[ServiceKey, Iterable[SliceKey]],
    ) -> FamilyView:
        """The view after `changed` Services (or their slices) changed; everything on first use.
        Its `changed` names their Service ports, those they had and those they have."""
        keys = set(changed)
        first = not self._ready
        if first:
            keys = set(state.services) | set(slices_by_service) | set(self._names)
            self._ready = True
        ports: set[ServicePortName] = set()
        for key in keys:
            ports.update(self._names.get(key, ()))
            self._recompute(state, key, slices_by_service.get(key, ()))
            ports.update(self._names.get(key, ()))
        return FamilyView(self._ports, self._endpoints, None if first else frozenset(ports))

    def reset(self) -> None:
        """Forget everything: the next `update` recomputes the whole view."""
        self._ports.clear()
        self._endpoints.clear()
        self._names.clear()
        self._ready = False

    def _recompute(self, state: ClusterState, key: ServiceKey, slice_keys: Iterable[SliceKey]) -> None:
        for name in self._names.pop(key, ()):
            self._ports.pop(name, None)
            self._endpoints.pop(name, None)
        svc = state.services.get(key)
        if svc is None:
            return
        names = []
        for sp in svc.ports:
            view = sp.for_family(self.family)
            if view is not None:
                self._ports[sp.name] = view
                names.append(sp.name)
        if not names:
            return
        self._names[key] = tuple(names)
        slices = [state.slices[k] for k in slice_keys if k in state.slices]
        for name, eps in endpoints_by_port(slices, self.family).items():
            if name in self._ports:
                self._endpoints[name] = eps
