"""The base of every "the input is wrong" error: the entry points end it with one clear line.

An error class derives from `UserError` when its message alone tells the user what to fix
(a config key, a data path, a checkpoint that does not verify). `pmp_scale.cli.fail_cleanly`
prints such an error as one line and exits with status 2; anything else is a bug and keeps its
traceback. Subclasses keep their builtin base too (ValueError, RuntimeError) for callers that
catch those.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, explained by the message; the CLI prints it as one line (exit status 2)."""
