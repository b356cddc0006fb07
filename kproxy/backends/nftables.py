"""nftables scripts, each one atomic transaction: small ones in-process, large ones by `nft -f -`.

The two run the same nft language through the same library. Measured (docs/mode-nftables.md,
"Kernel interface: measured"): a one-endpoint change costs 15 to 20 ms through `nft -f` at any
size, nearly all of it the process start and nft's own set-up, and about 0.3 ms through
libnftables in-process (`libnftables.so.1`, which the `nftables` package depends on, through
ctypes). A full table is the other way round: its parse takes hundreds of MB at 50,000 Services,
which a child process gives back when it exits and a long-lived daemon would keep, so scripts
past `IN_PROCESS_MAX` bytes go to `nft -f -`. Without the library every script does.

nft applies a whole script or nothing. When it refuses, its error names the line
(`/dev/stdin:LINE:COL-COL: Error: ...`, `<cmdline>:LINE:...` in-process); the BackendError
carries that line with its neighbours so the log shows what was refused without the whole
(possibly huge) script.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
from collections.abc import Iterable
from typing import Any

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


IN_PROCESS_MAX = 256 * 1024


class LibNftables:
    """One libnftables context (nft_ctx_new), its output and errors kept in buffers."""

    def __init__(self, soname: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(soname)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_filename.restype = ctypes.c_int
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, script: str) -> tuple[int, str]:
        """The script's return code and nft's error text.

        Read from a memfd rather than a buffer: libnftables 1.0.6 locates an error in a
        multi-line buffer on its first line, in a file on the right one."""
        fd = os.memfd_create("kproxy-nft", os.MFD_CLOEXEC)
        try:
            os.write(fd, script.encode())
            rc = self._lib.nft_run_cmd_from_filename(self._ctx, f"/proc/self/fd/{fd}".encode())
        finally:
            os.close(fd)
        self._lib.nft_ctx_get_output_buffer(self._ctx)  # read, so the next call starts empty
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        return int(rc), err

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class Nft:
    def __init__(self, binary: str = "nft", in_process: bool = True) -> None:
        self.binary = binary
        self._netlink: NftNetlink | None = None
        # None: not tried yet; False: the library could not be loaded, `nft -f` does all.
        self._lib: LibNftables | bool | None = None if in_process else False

    def _libnft(self) -> LibNftables | None:
        # Created on first use, in the thread (and so the network namespace) that syncs.
        if self._lib is None:
            try:
                self._lib = LibNftables()
            except OSError:
                self._lib = False
        return self._lib if isinstance(self._lib, LibNftables) else None

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
        lib = self._libnft() if len(script) <= IN_PROCESS_MAX else None
        if lib is not None:
            rc, err = lib.run(script)
            if rc != 0:
                raise BackendError(
                    "nft refused the transaction; the previous ruleset stays",
                    argv=("libnftables",),
                    returncode=rc,
                    stderr=err[:4000],
                    context=context(script, err),
                )
            return
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

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        """`nft -j list table`: the table's objects as nft's JSON gives them (`kproxy status
        --check` only: it fetches the whole ruleset); None when there is no such table."""
        argv = [self.binary, "-j", "list", "table", family, name]
        res = _run(argv)
        if res.returncode != 0:
            if "No such file or directory" in res.stderr:
                return None
            raise BackendError(
                "nft could not list the table", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr
            )
        try:
            listed = json.loads(res.stdout)
        except ValueError as e:
            raise BackendError("nft -j printed no JSON", argv=tuple(argv), stderr=res.stdout[:400]) from e
        return list(listed.get("nftables", ()))

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
