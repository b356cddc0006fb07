"""Run a command and report its own peak RSS and CPU times: `rusage.py REPORT argv...`.

A child's peak RSS (ru_maxrss) starts at what its parent's RSS was when it forked or spawned it
(with posix_spawn's CLONE_VM the child even shares that memory until exec, and exec keeps the
peak). The benchmark process holds whole generated clusters, so a command it starts directly
reports the benchmark's size, not its own. This small, fresh process starts it instead, waits
for it and writes its figures to REPORT as JSON; its exit status is the command's.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    report, argv = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    figures = {
        "wall_s": time.perf_counter() - started,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "maxrss_mib": usage.ru_maxrss / 1024,
    }
    with open(report, "w") as f:
        json.dump(figures, f)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
