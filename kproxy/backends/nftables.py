"""nftables through `nft -f -`: one script, one atomic transaction.

nft applies a whole script or nothing. When it refuses, its error names the line
(`/dev/stdin:LINE:COL-COL: Error: ...`); the BackendError carries that line with its neighbours
so the log shows what was refused without the whole (possibly huge) script.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable

from kproxy.backends.nftnl import NftNetlink, TableProbe
from kproxy.errors import BackendError

_LINE = re.compile(r"^[^:\n]*:(\d+):\d+-\d+: Error", re.M)
NEIGHBOURS = 3


def _run(argv: list[str], stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise BackendError("nft is not installed", argv=tuple(argv)) from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"nft did not finish in {timeout}s", argv=tuple(argv)) from e


def context(script: str, stderr: str) -> str:
    """The failing lines nft names, each with its neighbours, numbered."""
    lines = script.splitlines()
    shown: list[str] = []
    for m in _LINE.finditer(stderr):
        n = int(m.group(1))
        for i in range(max(1, n - NEIGHBOURS), min(len(lines), n + NEIGHBOURS) + 1):
            mark = ">" if i == n else " "
            shown.append(f"{mark}{i:>6}: {lines[i - 1]}")
        if len(shown) > 40:
            break
    return "\n".join(shown)


class Nft:
    def __init__(self, binary: str = "nft") -> None:
        self.binary = binary
        self._netlink: NftNetlink | None = None

    def _nl(self) -> NftNetlink:
        # Opened on first use, in the thread (and so the network namespace) that syncs.
        if self._netlink is None:
            self._netlink = NftNetlink()
        return self._netlink

    def generation(self) -> int:
        return self._nl().generation()

    def probe(self, family: str, table: str, sets: Iterable[str]) -> TableProbe:
        return self._nl().probe(family, table, sets)

    def apply(self, script: str) -> None:
        argv = [self.binary, "-f", "-"]
        res = _run(argv, stdin=script)
        if res.returncode != 0:
            raise BackendError(
                "nft refused the transaction; the previous ruleset stays",
                argv=tuple(argv),
                returncode=res.returncode,
                stderr=res.stderr[:4000],
                context=context(script, res.stderr),
            )

    def delete_table(self, family: str, name: str) -> bool:
        argv = [self.binary, "delete", "table", family, name]
        res = _run(argv)
        if res.returncode == 0:
            return True
        if "No such file or directory" in res.stderr:
            return False
        raise BackendError(
            "nft could not delete the table", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr
        )
