"""Kubernetes label selectors in their string form (``kubectl -l``), parsed and matched (pure).

Used for ``--edge-node-selector``: which nodes are edge nodes (they get hostPort programming, and
their addresses are the Ingress status). Grammar, as ``k8s.io/apimachinery/pkg/labels``:

- ``key`` (exists), ``!key`` (does not exist),
- ``key=value``, ``key==value``, ``key!=value`` (``!=`` also matches nodes without the key),
- ``key in (a,b)``, ``key notin (a,b)`` (``notin`` also matches nodes without the key),
- terms joined by ``,`` and all of them must hold. The empty selector matches everything.

Keys are ``[prefix/]name`` with the API's character rules; values are label values (63
characters of ``[A-Za-z0-9_.-]``, alphanumeric at both ends, or empty). A selector that does
not parse raises `ConfigError` naming the offending term, so a typo in a flag stops the
command instead of silently selecting nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kproxy.errors import ConfigError

DEFAULT_EDGE_SELECTOR = "node-role.kubernetes.io/edge"

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*"
_KEY = re.compile(rf"(?:{_PREFIX}/)?{_NAME}")
_VALUE = re.compile(rf"(?:{_NAME})?")
_SET_TERM = re.compile(r"\s*(\S+)\s+(in|notin)\s+\(([^()]*)\)\s*")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # exists, !exists, =, !=, in, notin
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # != and notin

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!exists":
            return "!" + self.key
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    @property
    def server_side(self) -> str:
        """The selector as the API server's ``labelSelector`` parameter (the same grammar)."""
        return str(self)


def parse_selector(text: str, flag: str = "--edge-node-selector") -> LabelSelector:
    reqs: list[Requirement] = []
    for term in _split_terms(text):
        reqs.append(_parse_term(term, flag))
    return LabelSelector(tuple(reqs))


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside ``( )``."""
    terms: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t.strip() for t in terms if t.strip()]


def _parse_term(term: str, flag: str) -> Requirement:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{flag}: term {term!r}: {why}")

    m = _SET_TERM.fullmatch(term)
    if m:
        key, op, raw = m.group(1), m.group(2), m.group(3)
        values = tuple(sorted({v.strip() for v in raw.split(",")}))
        _check_key(key, bad)
        for v in values:
            if not _VALUE.fullmatch(v):
                raise bad(f"{v!r} is not a label value")
        return Requirement(key, op, values)
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (p.strip() for p in term.split(op, 1))
            _check_key(key, bad)
            if not _VALUE.fullmatch(value):
                raise bad(f"{value!r} is not a label value")
            return Requirement(key, "!=" if op == "!=" else "=", (value,))
    if term.startswith("!"):
        key = term[1:].strip()
        _check_key(key, bad)
        return Requirement(key, "!exists")
    _check_key(term, bad)
    return Requirement(term, "exists")


def _check_key(key: str, bad: Callable[[str], ConfigError]) -> None:
    if not _KEY.fullmatch(key) or len(key) > 316:
        raise bad(f"{key!r} is not a label key")
