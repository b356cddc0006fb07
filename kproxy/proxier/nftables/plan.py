"""The nftables plan, pure: the one nft script that turns what was applied into what is desired.

A full plan (nothing applied, or the fixed part changed) writes the whole table in one
transaction that first deletes whatever table of ours is there (`add table` then `delete table`,
so it works on an empty kernel too): packets see the old table or the new one, never a half-built
one. A partial plan writes only the difference for the Service ports that changed: their map and
set elements added or deleted, their new chains added, changed chains flushed and refilled, their
stale chains and affinity sets deleted. Nothing is read back from the kernel.

What was applied is remembered compactly (`Applied`): the last render's per-Service objects
(shared with the render's own reuse, not copied) and, per container, which keys are claimed by how
many Service ports. A key several Service ports claim (a ClusterIP of a multi-port Service, the
hairpin pair of an endpoint in several Services) is added with its first claim and deleted with
its last. Where two claims disagree on a map value (two Services on one external IP and port) the
first one keeps the key until it lets go.

Order inside one transaction matters to nft: an element pointing to a chain is deleted before
the chain, a chain is flushed before a set its rules name is deleted, and every chain and set is
declared before a rule or element names it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.model import ServicePortName
from kproxy.proxier.nftables import names
from kproxy.proxier.nftables.render import Chain, Container, Element, Ruleset, ServiceObjects

# Elements per `add element` command: long lines are fine for nft, but a failing line should
# still point near its cause.
_BATCH = 64

# Who claims one key: nearly always one Service port, kept as just its value (a set's element
# has the value ""); otherwise every distinct value with its count, in claim order. None: a
# key released in a partial plan (dropped when the plan is committed).
Claim = tuple[str, int]
Claims = str | list[Claim] | None


@dataclass
class Applied:
    """What the last committed transaction put in the kernel, kept in memory."""

    fixed_key: str
    services: Mapping[ServicePortName, ServiceObjects]
    # container -> key -> claims in order: [(value, count), ...]
    claims: dict[str, dict[str, Claims]] = field(default_factory=dict)
    # The shared layout's chains and sets (render.shared_objects), compared as one more port.
    shared: ServiceObjects = ServiceObjects()


def _shared(rs: Ruleset) -> ServiceObjects:
    return ServiceObjects(chains=rs.shared_chains, sets=rs.shared_sets)


@dataclass(frozen=True)
class NftPlan:
    text: str
    full: bool
    chains_written: int = 0
    chains_deleted: int = 0
    elements_added: int = 0
    elements_deleted: int = 0
    # What `claims` looks like once this plan is committed (only the touched keys on a
    # partial plan; the proxier merges them).
    claims: dict[str, dict[str, Claims]] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text

    @property
    def empty(self) -> bool:
        return not self.text


def fixed_key(rs: Ruleset) -> str:
    """Everything outside the Service ports, as one string: a change rewrites the table."""
    parts = [f"{c.name}|{c.hook}|{'|'.join(c.rules)}" for c in rs.chains]
    parts += [f"{c.name}|{c.spec()}" for c in rs.containers]
    parts += ["|".join(e) for e in rs.elements]
    return "\n".join(parts)


def _prefix(rs: Ruleset) -> str:
    return f"{rs.nft_family} {names.TABLE}"


def _chain_lines(t: str, chain: Chain) -> list[str]:
    return [f"add rule {t} {chain.name} {rule}" for rule in chain.rules]


def _element_lines(t: str, verb: str, container: str, items: Iterable[tuple[str, str]], keys_only: bool) -> list[str]:
    out: list[str] = []
    batch: list[str] = []
    for key, value in items:
        batch.append(key if keys_only or not value else f"{key} : {value}")
        if len(batch) == _BATCH:
            out.append(f"{verb} element {t} {container} {{ {', '.join(batch)} }}")
            batch = []
    if batch:
        out.append(f"{verb} element {t} {container} {{ {', '.join(batch)} }}")
    return out


def _claims_of(rs: Ruleset, ports: list[ServiceObjects]) -> dict[str, dict[str, Claims]]:
    """Who claims each key, `ports` (the Service ports' objects) in name order."""
    claims: dict[str, dict[str, Claims]] = {c.name: {} for c in (*rs.containers, *rs.shared_sets)}
    for objs in (ServiceObjects(elements=rs.elements), *ports):
        for cont, key, value in objs.elements:
            mine = claims[cont]
            if key in mine:
                _claim(mine, key, value)
            else:
                mine[key] = value
    return claims


def _first(claims: Claims) -> str | None:
    """The value in the kernel: the first claim's."""
    if claims is None or isinstance(claims, str):
        return claims
    return claims[0][0] if claims else None


def _claim(claims: dict[str, Claims], key: str, value: str) -> None:
    cur = claims.get(key)
    if cur is None:
        claims[key] = value
        return
    if isinstance(cur, str):
        cur = claims[key] = [(cur, 1)]
    for i, (v, n) in enumerate(cur):
        if v == value:
            cur[i] = (v, n + 1)
            return
    cur.append((value, 1))


def _release(claims: dict[str, Claims], key: str, value: str) -> None:
    cur = claims.get(key)
    if isinstance(cur, str):
        if cur == value:
            claims[key] = None
        return
    for i, (v, n) in enumerate(cur or []):
        if v == value and cur is not None:
            if n > 1:
                cur[i] = (v, n - 1)
            else:
                del cur[i]
            if not cur:
                claims[key] = None
            elif len(cur) == 1 and cur[0][1] == 1:
                claims[key] = cur[0][0]
            return


def full_script(rs: Ruleset) -> str:
    return full_plan(rs).text


def full_plan(rs: Ruleset) -> NftPlan:
    t = _prefix(rs)
    lines = [
        # Delete whatever table of ours is there; `add` first so that the delete cannot fail.
        f"add table {t}",
        f"delete table {t}",
        f'add table {t} {{ comment "rules for kproxy" ; }}',
    ]
    chains = [*rs.chains, *rs.shared_chains]
    # Sorted once: 50,000 names compare by their dataclass __lt__, 0.4 s a sort.
    ports = [rs.services[s] for s in sorted(rs.services)]
    svc_chains = [c for objs in ports for c in objs.chains]
    for c in chains:
        lines.append(f"add chain {t} {c.name} {{ {c.hook} ; }}" if c.hook else f"add chain {t} {c.name}")
    lines += [f"add chain {t} {c.name}" for c in svc_chains]
    for container in (*rs.containers, *rs.shared_sets):
        lines.append(f"add {container.kind} {t} {container.name} {container.spec()}")
    for objs in ports:
        lines += [f"add set {t} {a.name} {a.spec()}" for a in objs.sets]
    for c in chains + svc_chains:
        lines += _chain_lines(t, c)
    claims = _claims_of(rs, ports)
    kinds = {c.name: c.kind for c in (*rs.containers, *rs.shared_sets)}
    added = 0
    for cont, keys in claims.items():
        items = [(k, v if isinstance(v, str) else _first(v) or "") for k, v in keys.items()]
        added += len(items)
        lines += _element_lines(t, "add", cont, items, kinds[cont] == "set")
    return NftPlan(
        text="\n".join(lines) + "\n",
        full=True,
        chains_written=len(chains) + len(svc_chains),
        elements_added=added,
        claims=claims,
    )


def plan(desired: Ruleset, applied: Applied | None, changed: Collection[ServicePortName] | None = None) -> NftPlan:
    """The script that turns `applied` into `desired`: full when nothing (or another fixed part)
    was applied, else only what the Service ports in `changed` (all of them when None; those
    whose objects are the very ones applied are skipped at once) changed."""
    if applied is None or applied.fixed_key != fixed_key(desired):
        return full_plan(desired)
    t = _prefix(desired)
    names_ = set(desired.services) | set(applied.services) if changed is None else set(changed)
    old_chains: dict[str, Chain] = {}
    new_chains: dict[str, Chain] = {}
    old_sets: dict[str, Container] = {}
    new_sets: dict[str, Container] = {}
    touched: dict[str, dict[str, Claims]] = {}
    before: dict[tuple[str, str], str | None] = {}

    base_claims = applied.claims

    def load(cont: str, key: str) -> dict[str, Claims]:
        mine = touched.setdefault(cont, {})
        if key not in mine:
            base = base_claims.get(cont, {}).get(key)
            before[(cont, key)] = _first(base)
            mine[key] = base if base is None or isinstance(base, str) else list(base)
        return mine

    def apply(elements: tuple[Element, ...], claim: bool) -> None:
        for cont, key, value in elements:
            (_claim if claim else _release)(load(cont, key), key, value)

    old_shared, new_shared = applied.shared, _shared(desired)
    # An in-place render took over the applied dicts: the ports it rendered had `replaced`.
    old_of = desired.replaced
    pairs = [
        (old_of[spn] if spn in old_of else applied.services.get(spn), desired.services.get(spn))
        for spn in sorted(names_)
    ]
    if old_shared != new_shared:
        pairs.append((old_shared, new_shared))
    for old, new in pairs:
        if old is new:
            continue
        if old is not None:
            old_chains.update((c.name, c) for c in old.chains)
            old_sets.update((s.name, s) for s in old.sets)
            apply(old.elements, claim=False)
        if new is not None:
            new_chains.update((c.name, c) for c in new.chains)
            new_sets.update((s.name, s) for s in new.sets)
            apply(new.elements, claim=True)

    kinds = {c.name: c.kind for c in (*desired.containers, *desired.shared_sets)}
    deletes: dict[str, list[tuple[str, str]]] = {}
    adds: dict[str, list[tuple[str, str]]] = {}
    for (cont, key), was in before.items():
        now = _first(touched[cont][key])
        if now == was:
            continue
        if was is not None:
            deletes.setdefault(cont, []).append((key, ""))
        if now is not None:
            adds.setdefault(cont, []).append((key, now))

    stale_chains = sorted(set(old_chains) - set(new_chains))
    changed_chains = sorted(c for c in new_chains if c in old_chains and old_chains[c].rules != new_chains[c].rules)
    added_chains = sorted(set(new_chains) - set(old_chains))
    stale_sets = sorted(set(old_sets) - set(new_sets))
    redefined = sorted(s for s in new_sets if s in old_sets and old_sets[s] != new_sets[s])
    added_sets = sorted(set(new_sets) - set(old_sets))

    lines: list[str] = []
    for cont in sorted(deletes):
        lines += _element_lines(t, "delete", cont, sorted(deletes[cont]), True)
    lines += [f"flush chain {t} {c}" for c in changed_chains + stale_chains]
    lines += [f"delete set {t} {s}" for s in stale_sets + redefined]
    lines += [f"add chain {t} {c}" for c in added_chains]
    lines += [f"add set {t} {s} {new_sets[s].spec()}" for s in redefined + added_sets]
    for c in changed_chains + added_chains:
        lines += _chain_lines(t, new_chains[c])
    for cont in sorted(adds):
        lines += _element_lines(t, "add", cont, sorted(adds[cont]), kinds.get(cont) == "set")
    lines += [f"delete chain {t} {c}" for c in stale_chains]
    return NftPlan(
        text="\n".join(lines) + "\n" if lines else "",
        full=False,
        chains_written=len(changed_chains) + len(added_chains),
        chains_deleted=len(stale_chains),
        elements_added=sum(len(v) for v in adds.values()),
        elements_deleted=sum(len(v) for v in deletes.values()),
        claims=touched,
    )


def committed(desired: Ruleset, applied: Applied | None, done: NftPlan) -> Applied:
    """What is applied once `done` (planned from `applied` to `desired`) has been committed."""
    if done.full or applied is None:
        return Applied(fixed_key(desired), desired.services, done.claims, _shared(desired))
    for cont, keys in done.claims.items():
        mine = applied.claims.setdefault(cont, {})
        for key, claims in keys.items():
            if claims is None:
                mine.pop(key, None)
            else:
                mine[key] = claims
    return Applied(applied.fixed_key, desired.services, applied.claims, _shared(desired))
