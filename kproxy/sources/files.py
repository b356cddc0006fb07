"""Cluster state from files, as `kubectl get ... -o yaml` (or `-o json`) prints them.

A path is a file or a directory of `*.yaml`/`*.yml`/`*.json` files; a file holds one object, a
`kind: List` (or `ServiceList`, ...), or several YAML documents. A file that cannot be read or
parsed is an InputError (the whole input is unusable); a malformed object is not.

Loading runs at the parser's speed: JSON through the standard library, YAML through libyaml's
C loader (`yaml.CSafeLoader`) when PyYAML was built with it, the pure-Python loader otherwise;
both give the same objects. `iter_objects` yields them one at a time, documents as the parser
reads them and the items of a list handed over one by one and dropped from it, so a caller that
converts as it goes (`kproxy.state.build_state`) never holds the raw tree of a whole cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, islice
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import InputError
from kproxy.sources import yaml_parallel
from kproxy.sources.streaming import Document, json_documents, yaml_documents


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    if path.is_file():
        return [path]
    raise InputError(f"{path}: no such file or directory")


# libyaml's loader when PyYAML has it (Debian's and the wheels' builds do): 5-10x the pure one.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _flatten(doc: Any, source: str) -> Iterator[dict[str, Any]]:
    """One parsed object, or the objects of a list already parsed whole (a list inside a list)."""
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise InputError(f"{source}: a document is not a Kubernetes object or list")
    kind = str(doc.get("kind", ""))
    if _is_list_kind(kind) and "items" in doc:
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise InputError(f"{source}: the items of a {kind} are not a list")
        yield from _list_items(iter(items), kind, source)
        return
    yield doc if isinstance(doc, dict) else dict(doc)


def _is_list_kind(kind: str) -> bool:
    return kind.endswith("List")  # List, ServiceList, EndpointSliceList, ...


def _list_items(items: Iterator[Any], kind: str | None, source: str) -> Iterator[dict[str, Any]]:
    """The items of a list as they arrive. `kind` None: the list's kind is not read yet (it
    follows ``items`` in `kubectl` output), so an item without a kind of its own waits for it."""
    waiting: list[Any] = []
    for item in items:
        if isinstance(item, dict) and "kind" not in item:
            if kind is None:
                waiting.append(item)
                continue
            if kind != "List":
                item["kind"] = kind[: -len("List")]
        yield from _flatten(item, source)
    if waiting:
        raise _KindAfterItems(waiting)


class _KindAfterItems(Exception):
    def __init__(self, items: list[Any]) -> None:
        self.items = items


def _streamed(doc: Document, source: str) -> Iterator[dict[str, Any]]:
    if doc.items is None:
        yield from _flatten(doc.head, source)
        return
    waiting: list[Any] = []
    try:
        yield from _list_items(doc.items, None, source)
    except _KindAfterItems as e:
        waiting = e.items
    if doc.head is None:  # a top-level JSON array: its elements are documents
        yield from (o for item in waiting for o in _flatten(item, source))
        return
    if not doc.listed:  # one object, not a list
        yield from _flatten(doc.head, source)
        return
    kind = str(doc.head.get("kind", ""))
    if kind and not _is_list_kind(kind):
        raise InputError(f"{source}: a {kind} with items is not a list of objects")
    yield from _list_items(iter(waiting), kind or "List", source)


def _documents(f: Path, loader: type[yaml.SafeLoader]) -> Iterator[Document]:
    try:
        text = f.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: cannot read: {e}") from e
    if f.suffix == ".json":
        return json_documents(text, str(f))
    if text.lstrip()[:1] in ("{", "["):  # `kubectl get -o json` saved as .yaml: JSON is faster
        return _json_else_yaml(text, loader, str(f))
    return yaml_parallel.documents(text, loader, str(f))


def _json_else_yaml(text: str, loader: type[yaml.SafeLoader], source: str) -> Iterator[Document]:
    """JSON, unless it is not JSON from its first value on (a YAML flow mapping, say)."""
    docs = json_documents(text, source)
    try:
        first = next(docs)
        if first.items is not None:
            items = first.items
            ahead = list(islice(items, 1))  # parses the members before the first item
            first.items = chain(ahead, items)
    except InputError:
        yield from yaml_documents(text, loader, source)
        return
    yield first
    yield from docs


def iter_objects(
    paths: Iterable[str | Path], *, loader: type[yaml.SafeLoader] = YAML_LOADER
) -> Iterator[dict[str, Any]]:
    """Every object of the files, one at a time (see the module docstring)."""
    for raw in paths:
        for f in _files(Path(raw)):
            for doc in _documents(f, loader):
                yield from _streamed(doc, str(f))


def load_objects(paths: Iterable[str | Path], *, loader: type[yaml.SafeLoader] = YAML_LOADER) -> list[dict[str, Any]]:
    """Every object of the files, as a list (for callers that sort them by kind first)."""
    return list(iter_objects(paths, loader=loader))
