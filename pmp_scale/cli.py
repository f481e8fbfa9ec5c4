"""Shared behaviour of the entry points: bad input ends with one clear line, not a traceback."""
from __future__ import annotations

import functools
import os
import sys

EXIT_BAD_INPUT = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", as opposed to a bug."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .models import ModelConfigError
    return (ConfigError, DataError, ModelConfigError, CheckpointError, FileNotFoundError)


def fail_cleanly(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is bad input
            if not isinstance(err, user_errors()):
                raise
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {err}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    return wrapper
