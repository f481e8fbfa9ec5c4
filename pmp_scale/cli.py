"""Shared behaviour of the entry points: bad input ends with one clear line, not a traceback."""
from __future__ import annotations

import functools
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", as opposed to a bug."""
    from .checkpoint import CheckpointError
    from .cluster import SharedFilesystemError
    from .config import ConfigError
    from .data import DataError
    from .mask.artifact import MaskArtifactError
    from .mask.sharded import MaskLayoutError
    from .models import ModelConfigError
    from .release import ReleaseError
    from .secrecy import AttackError
    return (ConfigError, DataError, ModelConfigError, CheckpointError, MaskArtifactError,
            MaskLayoutError, ReleaseError, AttackError, SharedFilesystemError,
            FileNotFoundError, FileExistsError)


def _exit_code(err: Exception) -> int | None:
    from .engine import NonFiniteError
    if isinstance(err, NonFiniteError):
        return EXIT_DIVERGED
    if isinstance(err, user_errors()):
        return EXIT_BAD_INPUT
    return None


def report_error(err: BaseException) -> None:
    """One line on stderr. Before the process group is up, errors come from checks every rank
    makes alike (config, data): rank 0 speaks for all. After it, an error may be one rank's own
    (its disk, its shard), so every rank that hits one says so, naming itself."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    elif os.environ.get("RANK", "0") == "0":
        rank = 0
    else:
        return
    prefix = "error" if rank == 0 else f"error (rank {rank})"
    print(f"{prefix}: {err}", file=sys.stderr, flush=True)


def fail_cleanly(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an expected failure
            code = _exit_code(err)
            if code is None:
                raise
            report_error(err)
            return code
    return wrapper
