"""The full audit of a release: release/audit's checks, then the data-free mask-recovery
attacks scored against the true mask (the owner's view) when the private artifact belongs to
the release. Here, above release/, because the attacks read releases (and fine-tune them).
"""
from __future__ import annotations

from pathlib import Path

from ..release.audit import Audit, check_release
from .attacks import AttackError
from .report import DATA_FREE, leaks, run_attacks


def audit_release(release_dir, private_dir=None, load: bool = True) -> Audit:
    """Everything a publisher should check before uploading (see tools/audit_release.py)."""
    audit = check_release(release_dir, private_dir, load)
    if audit.bound:
        _attack(Path(release_dir), Path(private_dir), audit)
    return audit


def _attack(release_dir: Path, private_dir: Path, audit: Audit) -> None:
    """The data-free mask-recovery attacks, scored against the true mask (the owner's view)."""
    try:
        result = run_attacks(release_dir, private_dir=private_dir, attacks=DATA_FREE)
    except AttackError as e:
        audit.problems.append(str(e))
        return
    for name, r in result["attacks"].items():
        audit.report.append(f"attack {name} ({r['channel']}): AUC {r['auc']:.3f}"
                            if r["auc"] is not None else f"attack {name}: no AUC (one class)")
    audit.problems += leaks(result)

