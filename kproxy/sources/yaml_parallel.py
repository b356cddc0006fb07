"""A large YAML list parsed on every core: the items of its last part or parts in child processes.

PyYAML hands over each of libyaml's events as a Python object: two million of them for 10,000
Services, seconds of one core that no loader built on it can avoid. A state file is nearly
always one ``kind: List`` whose ``items`` are a block sequence at column 0 (`kubectl get -o
yaml`), and a line that starts with ``- `` there begins an item whatever came before it, unless a
quoted scalar or a flow collection runs across it. So the items are cut at such lines into
parts: forked children parse the later parts and write their items to a memfd as batches of
`marshal` (`pickle` for values marshal has no form for, timestamps say), while this process
parses the rest of the file and converts what arrives.

Nothing is taken on trust. This process's own parse must find ``items`` starting where the plan
says and ending exactly at its first cut, each child's part must parse whole as one sequence,
and an item is handed on only once the next one is built (so it ended before it). Any doubt, a
child's failure, or any parse error falls back to the one-process parse of the whole text, which
skips the items already handed on and reports errors at their true line. Both give the same
objects; the tests hold them to it.
"""

from __future__ import annotations

import gc
import marshal
import os
import pickle
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, pairwise
from typing import Any

import yaml
from yaml import events as ev

from kproxy.errors import InputError
from kproxy.sources.streaming import Document, YamlBuilder, yaml_documents

MIN_SIZE = 1 << 20  # below about 700 Services a fork costs more than it saves
MAX_PARTS = 4
# This process converts every item besides parsing its own part: it takes a smaller one.
OWN_SHARE = 0.6
BATCH = 256  # items per record: this process converts them while the child parses the next

_ITEMS = re.compile(r"^items:[ \t]*\n(?=-[ \n])", re.M)
# The first line at column 0 that is not an item, a comment or blank: where the items end.
_ITEMS_END = re.compile(r"\n(?![ \t\r\n#]|-[ \t\r\n])")
# Several documents, or directives (%TAG changes what every part means): not cut.
_DOCUMENT_MARK = re.compile(r"^(?:---|\.\.\.|%)", re.M)


@dataclass(frozen=True)
class Cut:
    """The items of a list run from `body` to `end`; this process parses them up to
    ``offsets[0]``, each child from one offset to the next, the last up to `end`."""

    body: int
    offsets: tuple[int, ...]
    end: int

    def parts(self) -> list[tuple[int, int]]:
        """The children's parts."""
        bounds = [*self.offsets, self.end]
        return list(pairwise(bounds))


def cut(text: str, parts: int) -> Cut | None:
    """Where the items of `text` are cut into at most `parts` parts; None if the text is not
    worth or fit to cut (small, several documents, no ``items`` block sequence at column 0)."""
    if parts < 2 or len(text) < MIN_SIZE:
        return None
    marks = _DOCUMENT_MARK.search(text)
    if marks is not None and (marks.start() != 0 or not text.startswith("---\n") or _DOCUMENT_MARK.search(text, 4)):
        return None
    items = _ITEMS.search(text)
    if items is None:
        return None
    body = items.end()
    past = _ITEMS_END.search(text, body)
    end = past.start() + 1 if past else len(text)
    span = end - body
    own = OWN_SHARE / parts
    shares = [own + i * (1 - own) / (parts - 1) for i in range(parts - 1)]
    offsets: list[int] = []
    for share in shares:
        at = text.find("\n- ", body + int(span * share), end)
        if at < 0:
            break
        if not offsets or at + 1 > offsets[-1]:
            offsets.append(at + 1)
    if not offsets:
        return None
    return Cut(body, tuple(offsets), end)


def parts_here() -> int:
    return min(len(os.sched_getaffinity(0)), MAX_PARTS)


def documents(text: str, loader_cls: type[yaml.SafeLoader], source: str) -> Iterator[Document]:
    """`streaming.yaml_documents`, on every core when `text` is a large list (see the module)."""
    plan = cut(text, parts_here())
    if plan is None:
        yield from yaml_documents(text, loader_cls, source)
        return
    children: list[_Child] = []
    try:
        for a, b in plan.parts():
            children.append(_Child.start(text[a:b], loader_cls))
    except OSError:  # no fork, no memfd (process or memory limits): one process does it all
        for child in children:
            child.stop()
        yield from yaml_documents(text, loader_cls, source)
        return
    try:
        doc = Document({})
        doc.items = _Parallel(text, plan, children, loader_cls, source, doc).items()
        yield doc
    finally:
        for child in children:
            child.stop()


class _Doubt(Exception):
    """The parallel parse cannot vouch for its result: the whole text is parsed in one process."""


@dataclass
class _Parallel:
    text: str
    plan: Cut
    children: list[_Child]
    loader_cls: type[yaml.SafeLoader]
    source: str
    doc: Document
    handed: int = 0  # items handed on so far
    ended: bool = False

    def items(self) -> Iterator[Any]:
        try:
            for item in self._own():
                self.handed += 1
                yield item
        except (_Doubt, yaml.YAMLError):
            for child in self.children:
                child.stop()
            yield from self._whole()

    def _own(self) -> Iterator[Any]:
        loader: Any = self.loader_cls(self.text[: self.plan.offsets[0]] + self.text[self.plan.end :])
        try:
            loader.get_event()  # StreamStart
            loader.get_event()  # DocumentStart
            if not loader.check_event(ev.MappingStartEvent):
                raise _Doubt
            yield from YamlBuilder(loader).mapping_streaming_items(self.doc, self)
            loader.get_event()  # DocumentEnd
            if not self.ended or not loader.check_event(ev.StreamEndEvent):
                raise _Doubt
        finally:
            loader.dispose()

    def start(self, event: Any) -> None:
        # The planned sequence, not an ``items`` of some other text (a quoted scalar's line).
        if self.ended or event.start_mark.index != self.plan.body:
            raise _Doubt

    def end(self, event: Any, held: list[Any]) -> Iterator[Any]:
        # Ended at the cut: no quoted scalar or flow collection ran across it.
        if event.start_mark.index != self.plan.offsets[0]:
            raise _Doubt
        self.ended = True
        yield from held
        for child in self.children:
            yield from child.items()

    def _whole(self) -> Iterator[Any]:
        docs = yaml_documents(self.text, self.loader_cls, self.source)
        whole = next(docs, None)
        self.doc.head, self.doc.listed = {}, False
        if whole is None or whole.items is None:
            if self.handed:
                raise InputError(f"{self.source}: the items of the list could not be read again")
            if whole is not None:
                self.doc.head = whole.head
            return
        self.doc.head = whole.head
        yield from islice(whole.items, self.handed, None)
        self.doc.listed = whole.listed
        for _ in docs:  # the cut refused texts of several documents: none can follow
            raise InputError(f"{self.source}: more than one document where one was parsed")


@dataclass
class _Child:
    """A forked process parsing one part of the items.

    Each batch of items goes to a memfd as one record (a tag, a size, the bytes), then one byte
    to a pipe says it is there, so this process converts a child's first items while the child
    still parses its last. A memfd, not the pipe itself, carries the items: a pipe holds 64 KiB,
    and a child blocked on a full pipe while this process parses its own part would be idle."""

    pid: int
    fd: int  # the memfd
    notes: int  # the pipe's read end
    done: bool = False

    @classmethod
    def start(cls, part: str, loader_cls: type[yaml.SafeLoader]) -> _Child:
        opened: list[int] = []
        try:
            opened.append(fd := os.memfd_create("kproxy-yaml-items", os.MFD_CLOEXEC))
            notes, noting = os.pipe()
            opened += [notes, noting]
            pid = os.fork()
        except OSError:
            for each in opened:
                os.close(each)
            raise
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            status = 1
            try:
                os.close(notes)
                gc.disable()
                _write_items(part, loader_cls, _Records(fd, noting))
                status = 0
            finally:
                os._exit(status)
        os.close(noting)  # so that the child's end is the last: EOF when it exits
        return cls(pid, fd, notes)

    def items(self) -> Iterator[Any]:
        offset = 0  # this process's own: the file offset is shared with the child's writes
        while True:
            notes = os.read(self.notes, 4096)
            if not notes:  # the child ended without its last record
                self._reap()
                raise _Doubt
            for _ in notes:
                head = self._pread(9, offset)
                tag, size = head[:1], int.from_bytes(head[1:], "little")
                data = self._pread(size, offset + 9)
                offset += 9 + size
                if tag == b"e":
                    if self._reap() != 0:
                        raise _Doubt
                    return
                try:
                    batch = marshal.loads(data) if tag == b"m" else pickle.loads(data)
                except (ValueError, EOFError, TypeError, pickle.UnpicklingError):
                    raise _Doubt from None
                yield from batch

    def _pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise _Doubt
        return data

    def _reap(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.done = True
        return status

    def stop(self) -> None:
        if not self.done:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()
        for fd in (self.fd, self.notes):
            if fd >= 0:
                os.close(fd)
        self.fd = self.notes = -1


@dataclass
class _Records:
    """The child's side: records into the memfd, a byte to the pipe for each."""

    fd: int
    noting: int

    def write(self, tag: bytes, data: bytes) -> None:
        record = memoryview(tag + len(data).to_bytes(8, "little") + data)
        while record:
            record = record[os.write(self.fd, record) :]
        os.write(self.noting, b".")


def _write_items(part: str, loader_cls: type[yaml.SafeLoader], out: _Records) -> None:
    """The part's items, parsed as a sequence of their own, in batches; ``e`` at the end."""
    loader: Any = loader_cls(part)
    builder = YamlBuilder(loader)
    loader.get_event()  # StreamStart
    loader.get_event()  # DocumentStart
    start = loader.get_event()
    if type(start) is not ev.SequenceStartEvent or start.anchor is not None or start.tag not in (None, "!"):
        raise _Doubt
    batch: list[Any] = []
    while not loader.check_event(ev.SequenceEndEvent):
        batch.append(builder.build())
        if len(batch) == BATCH:
            _write_batch(batch, out)
            batch = []
    _write_batch(batch, out)
    loader.get_event()  # SequenceEnd
    loader.get_event()  # DocumentEnd
    if not loader.check_event(ev.StreamEndEvent):
        raise _Doubt
    out.write(b"e", b"")


def _write_batch(batch: list[Any], out: _Records) -> None:
    try:
        out.write(b"m", marshal.dumps(batch))
    except ValueError:  # a timestamp, a set: values only pickle has a form for
        out.write(b"p", pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
