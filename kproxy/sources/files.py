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

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import InputError


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    if path.is_file():
        return [path]
    raise InputError(f"{path}: no such file or directory")


# libyaml's loader when PyYAML has it (Debian's and the wheels' builds do): 5-10x the pure one.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _flatten(doc: Any, source: str) -> Iterator[dict[str, Any]]:
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise InputError(f"{source}: a document is not a Kubernetes object or list")
    kind = str(doc.get("kind", ""))
    if kind == "List" or (kind.endswith("List") and "items" in doc):
        item_kind = kind[: -len("List")] if kind != "List" else ""
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise InputError(f"{source}: the items of a {kind} are not a list")
        items.reverse()  # popped from the end, in the file's order, each dropped once handed over
        while items:
            item = items.pop()
            if isinstance(item, dict) and item_kind and "kind" not in item:
                item["kind"] = item_kind
            yield from _flatten(item, source)
        return
    yield doc if isinstance(doc, dict) else dict(doc)


def _documents(f: Path, loader: type[yaml.SafeLoader]) -> Iterator[Any]:
    try:
        text = f.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: cannot read: {e}") from e
    if f.suffix == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if f.suffix == ".json":
                raise InputError(f"{f}: not JSON: {e}") from e
        else:
            del text
            yield from doc if isinstance(doc, list) else [doc]
            return
    try:
        yield from yaml.load_all(text, Loader=loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise InputError(f"{f}: not YAML: {e}") from e


def iter_objects(
    paths: Iterable[str | Path], *, loader: type[yaml.SafeLoader] = YAML_LOADER
) -> Iterator[dict[str, Any]]:
    """Every object of the files, one at a time (see the module docstring)."""
    for raw in paths:
        for f in _files(Path(raw)):
            for doc in _documents(f, loader):
                yield from _flatten(doc, str(f))


def load_objects(paths: Iterable[str | Path], *, loader: type[yaml.SafeLoader] = YAML_LOADER) -> list[dict[str, Any]]:
    """Every object of the files, as a list (for callers that sort them by kind first)."""
    return list(iter_objects(paths, loader=loader))
