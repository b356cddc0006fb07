"""The kproxy error tree.

Every error kproxy raises on purpose is a KproxyError, so the CLI can map them to exit
statuses and the daemon can tell a retryable kernel failure from a bug.
"""

from __future__ import annotations


class KproxyError(Exception):
    """Base of every error kproxy raises deliberately."""


class ConfigError(KproxyError):
    """Configuration or command-line input that cannot be used (exit status 2)."""


class InputError(KproxyError):
    """A state file or API answer that is unusable as a whole (exit status 2)."""


class InvalidObject(KproxyError):
    """One API object that cannot be proxied; it is skipped, everything else goes on.

    `ref` names the object (``Service ns/name``) and `field` the offending field path, so the
    message a user sees points at what to fix.
    """

    def __init__(self, ref: str, field: str, reason: str) -> None:
        super().__init__(f"{ref}: {field}: {reason}")
        self.ref = ref
        self.field = field
        self.reason = reason


class WatchError(KproxyError):
    """The API server could not be listed or watched (retried with backoff)."""


class BackendError(KproxyError):
    """A kernel-facing command or netlink call failed (exit status 1; retried as a full sync).

    Keeps what an operator needs to see the cause: the argv, the exit status, stderr, and for
    restore-style input the failing line with its neighbours.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        stderr: str = "",
        context: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.context = context

    def __str__(self) -> str:
        parts = [self.args[0]]
        if self.argv:
            parts.append(f"command: {' '.join(self.argv)}")
        if self.returncode is not None:
            parts.append(f"exit status: {self.returncode}")
        if self.stderr:
            parts.append(f"stderr: {self.stderr.strip()}")
        if self.context:
            parts.append(f"input around the failing line:\n{self.context}")
        return "\n".join(parts)
