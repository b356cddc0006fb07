"""ipsets through `ipset save` (read) and `ipset restore` (write).

What it guarantees:
- `save()` returns only the sets the caller owns (a name predicate), with their type, family,
  maxelem and entries exactly as `ipset save` prints them.
- `restore()` feeds one input to one `ipset restore` process. ipset has no transactions: on a
  refused line the earlier lines stay applied and the error (BackendError) names the line with
  its neighbours. Callers that need a set never to be seen half-filled build it under another
  name and `swap` it in (Calico's way), which is atomic.
- Running `ipset` is the only thing this module does (as DESIGN.md wants of every backend).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from typing import NamedTuple

from kproxy.errors import BackendError

_ERR_LINE = re.compile(r"Error in line (\d+)")


class SetEntry(NamedTuple):
    name: str
    type: str
    family: str  # "inet", "inet6", or "" for bitmap types
    maxelem: int
    entries: frozenset[str]


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as e:
        raise BackendError("ipset is not installed", argv=tuple(argv)) from e
    except subprocess.TimeoutExpired as e:
        raise BackendError("ipset did not finish in 120s", argv=tuple(argv)) from e


def parse_save(text: str, owned: Callable[[str], bool]) -> dict[str, SetEntry]:
    headers: dict[str, tuple[str, str, int]] = {}
    entries: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        if parts[0] == "create" and owned(parts[1]):
            opts = dict(zip(parts[3::2], parts[4::2], strict=False))
            headers[parts[1]] = (parts[2], opts.get("family", ""), int(opts.get("maxelem", "0") or 0))
            entries.setdefault(parts[1], set())
        elif parts[0] == "add" and parts[1] in headers:
            entries[parts[1]].add(parts[2])
    return {n: SetEntry(n, t, f, m, frozenset(entries.get(n, ()))) for n, (t, f, m) in headers.items()}


class Ipset:
    def __init__(self) -> None:
        self.restores = 0
        self.lines_written = 0

    def save(self, owned: Callable[[str], bool]) -> dict[str, SetEntry]:
        argv = ["ipset", "save"]
        res = _run(argv)
        if res.returncode != 0:
            raise BackendError("reading ipsets failed", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr)
        return parse_save(res.stdout, owned)

    def restore(self, text: str) -> None:
        if not text:
            return
        # -exist: creating a set that exists or adding an entry that is there is no error, so
        # a concurrent change or a half-applied earlier run does not wedge every later sync.
        argv = ["ipset", "restore", "-exist"]
        res = _run(argv, stdin=text)
        if res.returncode != 0:
            raise BackendError(
                "ipset restore refused a line; the lines before it are applied",
                argv=tuple(argv),
                returncode=res.returncode,
                stderr=res.stderr,
                context=_context(text, res.stderr),
            )
        self.restores += 1
        self.lines_written += text.count("\n")

    def destroy(self, names: list[str]) -> None:
        self.restore("".join(f"destroy {n}\n" for n in names))


def _context(text: str, stderr: str, around: int = 3) -> str:
    m = _ERR_LINE.search(stderr)
    if not m:
        return ""
    n = int(m.group(1))
    lines = text.splitlines()
    lo, hi = max(1, n - around), min(len(lines), n + around)
    return "\n".join(f"{'>' if i == n else ' '}{i:6d}  {lines[i - 1]}" for i in range(lo, hi + 1))
