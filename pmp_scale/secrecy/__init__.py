"""Mask secrecy: mask-recovery attacks on a release, scored against the private mask.

`run_attacks` is the suite (tools/attack_mask.py); `leaks` is the audit's rule over its result;
`audit_release` is the full audit of a release (tools/audit_release.py).
"""
from .attacks import COMMON_SEEDS, Attack, AttackError, Target
from .audit import audit_release
from .report import DATA_FREE, leaks, run_attacks

__all__ = ["Attack", "AttackError", "COMMON_SEEDS", "DATA_FREE", "Target", "audit_release",
           "leaks", "run_attacks"]
