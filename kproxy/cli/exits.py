"""The exit statuses of every kproxy command (the contract in docs/architecture.md): 2 for input
that is unusable as a whole, 1 when the kernel (or nginx) refused. Its own module so that command
groups in other modules share it without importing `kproxy.cli.main`, which loads them when named."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from kproxy.errors import BackendError, ConfigError, InputError

F = TypeVar("F", bound=Callable[..., Any])


def exits(fn: F) -> F:
    """Map the error tree to the exit statuses of the contract."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, InputError) as e:
            click.echo(f"kproxy: {e}", err=True)
            sys.exit(2)
        except BackendError as e:
            click.echo(f"kproxy: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
