"""Documents read so that the items of a list arrive one at a time.

A state file is usually one `kind: List` of every object in a cluster. Parsed whole, its raw tree
(ten times the file's size) is alive at once, on top of the model it is converted into: at
10,000 Services that tree alone was most of `kproxy sync`'s peak memory. So a document's
``items`` are handed over as they are parsed, each built and converted before the next is read;
every other member of the document is kept (`Document.head`).

- JSON: the standard library's decoder parses every value (`raw_decode`); only the top-level
  object and array are walked here, so JSON semantics are the decoder's.
- YAML: the loader's own parser (libyaml's when given `CSafeLoader`) produces events and its
  own resolver and constructors give every scalar its type, exactly as `yaml.load` would (the
  two loaders give equal objects; the tests hold them to it). Anchors, aliases and merge keys
  work within a document. Plain scalars are built once per distinct text and shared, which also
  interns the names, namespaces and protocols repeated across thousands of objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import yaml
from yaml import events as ev

from kproxy.errors import InputError


@dataclass
class Document:
    """One document: `head` holds every member but ``items``; `items`, when the document is an
    object with an ``items`` list (or a top-level JSON array), yields them. `head` is complete
    once `items` is exhausted (members after ``items`` are read then)."""

    head: Any
    items: Iterator[Any] | None = None
    listed: bool = False  # an ``items`` list was met (an empty one too)


# -- JSON -----------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def json_documents(text: str, source: str) -> Iterator[Document]:
    try:
        pos = _SPACE.match(text, 0).end()  # type: ignore[union-attr]  # matches the empty string
        if text.startswith("[", pos):
            yield Document(None, _json_errors(_json_array(text, pos), source), listed=True)
        elif text.startswith("{", pos):
            doc = Document({})
            doc.items = _json_errors(_json_object(text, pos, doc), source)
            yield doc
        else:
            value, pos = _DECODER.raw_decode(text, pos)
            _json_end(text, pos)
            yield Document(value)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not JSON: {e}") from e


def _json_errors(values: Iterator[Any], source: str) -> Iterator[Any]:
    try:
        yield from values
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not JSON: {e}") from e


def _json_end(text: str, pos: int) -> None:
    if _SPACE.match(text, pos).end() != len(text):  # type: ignore[union-attr]
        raise json.JSONDecodeError("Extra data", text, pos)


def _json_array(text: str, pos: int) -> Iterator[Any]:
    """The elements of the array at `pos` (its ``[``), then the end of the text."""
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        _json_end(text, pos + 1)
        return
    while True:
        value, pos = _DECODER.raw_decode(text, pos)
        yield value
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    _json_end(text, pos + 1)


def _json_object(text: str, pos: int, doc: Document) -> Iterator[Any]:
    """The elements of the object's ``items`` array as they are decoded; every other member
    into `doc.head`."""
    head = doc.head
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    while not text.startswith("}", pos):
        if not text.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if key == "items" and text.startswith("[", pos):
            doc.listed = True
            pos = yield from _json_items(text, pos)
        else:
            head[key], pos = _DECODER.raw_decode(text, pos)
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        elif not text.startswith("}", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    _json_end(text, pos + 1)


def _json_items(text: str, pos: int) -> Generator[Any, None, int]:
    """Yields the elements of the array at `pos`; returns the position after its ``]``."""
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        return pos + 1
    while True:
        value, pos = _DECODER.raw_decode(text, pos)
        yield value
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if text.startswith("]", pos):
            return pos + 1
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]


# -- YAML -----------------------------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_SCALAR = ev.ScalarEvent
_MAPPING_START, _MAPPING_END = ev.MappingStartEvent, ev.MappingEndEvent
_SEQUENCE_START, _SEQUENCE_END = ev.SequenceStartEvent, ev.SequenceEndEvent
_MISSING = object()


def yaml_documents(text: str, loader_cls: type[yaml.SafeLoader], source: str) -> Iterator[Document]:
    # The parser's methods are untyped in the stubs, and CParser is not a SafeLoader subclass.
    loader: Any = loader_cls(text)
    try:
        builder = YamlBuilder(loader)
        loader.get_event()  # StreamStart
        while not loader.check_event(ev.StreamEndEvent):
            loader.get_event()  # DocumentStart
            builder.anchors = {}
            if loader.check_event(ev.MappingStartEvent):
                doc = Document({})
                doc.items = _yaml_errors(builder.mapping_streaming_items(doc), source)
                yield doc
            else:
                yield Document(builder.build())
            loader.get_event()  # DocumentEnd
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not YAML: {e}") from e
    finally:
        loader.dispose()


def _yaml_errors(values: Iterator[Any], source: str) -> Iterator[Any]:
    try:
        yield from values
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not YAML: {e}") from e


class ItemsWatch(Protocol):
    """Sees where a document's ``items`` start and end (`YamlBuilder.mapping_streaming_items`)."""

    def start(self, event: Any) -> None: ...

    def end(self, event: Any, held: list[Any]) -> Iterator[Any]: ...


class YamlBuilder:
    """Python objects straight from the parser's events, with the loader's resolver and
    constructors (what `yaml.load` does through a node graph, without keeping one).

    Each event is taken from the parser once (`get_event`) and dispatched on its type: the
    parser's own `check_event`/`peek_event` cost a call into it each, and a 10,000-Service file
    is two million events."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.anchors: dict[str, Any] = {}
        self._plain: dict[str, Any] = {}  # a plain scalar's text -> its value, built once
        # tag -> SafeConstructor's function (None's raises "could not determine a constructor").
        self._constructors: dict[Any, Callable[..., Any]] = loader.yaml_constructors
        # A quoted scalar without a tag is a string, unless path resolvers say otherwise.
        self._quoted_are_strings = not getattr(loader, "yaml_path_resolvers", None)

    def build(self) -> Any:
        return self._node(self.loader.get_event())

    def _node(self, event: Any) -> Any:
        kind = type(event)
        if kind is _SCALAR:
            if event.anchor is None and event.tag is None and event.implicit[0]:
                # plain and untagged, by far the most common: its type depends on its text alone
                value = self._plain.get(event.value, _MISSING)
                if value is not _MISSING:
                    return value
            value = self._scalar(event)
        elif kind is _MAPPING_START:
            value = {}
            if event.anchor is not None or event.tag is not None:
                self._anchor(event, value)
            self._members(value)
            return value
        elif kind is _SEQUENCE_START:
            value = []
            if event.anchor is not None or event.tag is not None:
                self._anchor(event, value)
            get = self.loader.get_event
            node = self._node
            append = value.append
            item = get()
            while type(item) is not _SEQUENCE_END:
                append(node(item))
                item = get()
            return value
        elif kind is ev.AliasEvent:
            if event.anchor not in self.anchors:
                mark: Any = event.start_mark  # libyaml's Mark is not the stubs' Mark
                raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", mark)
            return self.anchors[event.anchor]
        else:
            mark = event.start_mark
            raise yaml.composer.ComposerError(None, None, f"unexpected {type(event).__name__}", mark)
        self._anchor(event, value)
        return value

    def mapping_streaming_items(self, doc: Document, watch: ItemsWatch | None = None) -> Iterator[Any]:
        """The document's root mapping into `doc.head`, but for an ``items`` sequence, whose
        elements are yielded one by one.

        With `watch`, the sequence's start event goes to `watch.start` before any element is
        built; each element is then yielded only once the next one is built (so it is known to
        have ended before it), and the last one goes to `watch.end` with the sequence's end
        event, to yield as it sees fit, before the members after ``items``."""
        loader = self.loader
        head = doc.head
        event = loader.get_event()  # MappingStart
        self._anchor(event, head)
        while not loader.check_event(ev.MappingEndEvent):
            key = self.build()
            if key == "items" and loader.check_event(ev.SequenceStartEvent) and not loader.peek_event().anchor:
                doc.listed = True
                start = loader.get_event()
                if watch is None:
                    while not loader.check_event(ev.SequenceEndEvent):
                        yield self.build()
                    loader.get_event()
                    continue
                watch.start(start)
                held: list[Any] = []
                while not loader.check_event(ev.SequenceEndEvent):
                    item = self.build()
                    if held:
                        yield held.pop()
                    held.append(item)
                yield from watch.end(loader.get_event(), held)
                continue
            self._member(head, key, self.build())
        loader.get_event()

    def _members(self, mapping: dict[Any, Any]) -> None:
        get = self.loader.get_event
        node = self._node
        plain = self._plain
        event = get()
        while type(event) is not _MAPPING_END:
            # A key is nearly always a plain scalar already met: looked up here, not in _node.
            if (
                type(event) is not _SCALAR
                or event.anchor is not None
                or event.tag is not None
                or not event.implicit[0]
                or (key := plain.get(event.value, _MISSING)) is _MISSING
            ):
                key = node(event)
            value = node(get())
            if type(key) is str:
                mapping[key] = value
            else:  # the merge key, or a key that is not a string
                self._member(mapping, key, value)
            event = get()

    def _member(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        if key is _MERGE_KEY:
            # SafeConstructor's merge: the merged mappings' keys, unless set explicitly.
            for merged in value if isinstance(value, list) else [value]:
                if not isinstance(merged, dict):
                    raise yaml.constructor.ConstructorError(None, None, "a merge key needs mappings", None)
                for k, v in merged.items():
                    mapping.setdefault(k, v)
            return
        try:
            mapping[key] = value
        except TypeError as e:  # a mapping or list as a key, which SafeLoader refuses too
            raise yaml.constructor.ConstructorError(None, None, f"found unhashable key: {e}", None) from e

    def _anchor(self, event: Any, value: Any) -> None:
        tag = getattr(event, "tag", None)
        if tag not in (None, "!", _MAP, _SEQ) and isinstance(event, ev.CollectionStartEvent):
            # !!set, !!omap, !!pairs: no Kubernetes object uses them; refused, not mis-built.
            mark: Any = event.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"unsupported tag {tag!r}", mark)
        if event.anchor is not None:
            self.anchors[event.anchor] = value

    def _scalar(self, event: Any) -> Any:
        tag = event.tag
        text = event.value
        if tag is None or tag == "!":
            if event.implicit[0]:  # plain: its type depends on its text alone
                try:
                    return self._plain[text]
                except KeyError:
                    pass
                tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))
                value = _MERGE_KEY if tag == _MERGE else self._value(tag, text, event)
                self._plain[text] = value
                return value
            if tag is None and self._quoted_are_strings:
                return text
            tag = self.loader.resolve(yaml.ScalarNode, text, (False, True))
        return self._value(tag, text, event)

    def _value(self, tag: str, text: str, event: Any) -> Any:
        if tag == _STR:
            return text
        node = yaml.ScalarNode(tag, text, event.start_mark, event.end_mark, event.style)
        fn = self._constructors.get(tag) or self._constructors[None]
        return fn(self.loader, node)


class _MergeKey:
    """`<<`: the merge key, kept apart from any string key."""


_MERGE_KEY = _MergeKey()
