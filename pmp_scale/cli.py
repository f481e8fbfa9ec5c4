"""Shared behaviour of the entry points: bad input ends with one clear line, not a traceback,
and the console shows our lines, not third-party notices (unless --verbose)."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

from .errors import UserError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", as opposed to a bug."""
    return (UserError, FileNotFoundError, FileExistsError)


def _exit_code(err: Exception) -> int | None:
    from .policies import NonFiniteError
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
    # One write, newline included: print() writes the text and its end separately, so lines of
    # ranks sharing the launcher's stderr could interleave.
    sys.stderr.write(f"{prefix}: {err}\n")
    sys.stderr.flush()


def fail_cleanly(main):
    """Wrap an entry point's `main`: a UserError (and the like, `user_errors`) is one line on
    stderr and exit status 2, a diverged run exit status 3, anything else its traceback."""
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


# Third-party notices that say nothing to a user of a healthy run.
_NOTICE_WARNINGS = [  # (message regex, category)
    (r"`torch\.distributed\.\w+` is deprecated", FutureWarning),  # DeepSpeed's collectives
]
_NOTICE_LOGGERS = {
    "torch.utils.cpp_extension": logging.ERROR,  # "No CUDA runtime is found" on CPU machines
    "streaming": logging.WARNING,                 # its defaults, once per loader
}


def tool_parser(doc: str, progress: bool = False):
    """An entry point's parser whose --help is its module docstring, usage examples kept;
    `progress`: the tool draws a progress bar, which --quiet turns off."""
    import argparse
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if progress:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def add_checkpoint_arguments(parser) -> None:
    """CKPT_DIR and --tag, for the tools that read a training checkpoint."""
    from pathlib import Path
    parser.add_argument("ckpt_dir", type=Path, help="a run_dir, its checkpoints/, or one tag")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00001000 (default: latest)")


def launcher_parser(description: str, config_help: str):
    """The launchers' shared arguments: --config, repeatable --set, --verbose, and the
    --local_rank that the deepspeed launcher passes to every rank."""
    import argparse
    parser = tool_parser(description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_verbose_flag(parser)
    return parser


def add_verbose_flag(parser) -> None:
    """The entry points' common `--verbose` (see `quiet_third_party`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party notices (DeepSpeed INFO lines, torch "
                             "deprecation warnings, build notices)")


THIRD_PARTY_QUIET = False  # what the entry point chose: processes it spawns choose the same


def quiet_third_party(verbose: bool = False) -> None:
    """Keep third-party noise out of the console unless `verbose`: torch's deprecation warnings
    raised inside DeepSpeed's collectives, the CUDA notice of CPU runs, DeepSpeed's INFO lines
    and its op-build notice, streaming's notices. Call it first thing in an entry point (before
    deepspeed is imported: some notices come at import). Process-wide, no environment change."""
    from . import ds_internals
    global THIRD_PARTY_QUIET
    THIRD_PARTY_QUIET = not verbose
    if verbose:
        ds_internals.set_deepspeed_log_level(logging.INFO)
        return
    for message, category in _NOTICE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in _NOTICE_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    ds_internals.set_deepspeed_log_level(logging.WARNING)
    ds_internals.hide_build_notices()
