"""The study's secrecy column: how well data-free attacks recover the private mask from a
release (ROC AUC of per-element scores against the true mask bits; 0.5 = chance).

`pmp_scale.secrecy.run_attacks` does the work when it is installed; without it, one baseline
attack stands in: score = |w| globally (trained elements drift away from the small init), its
AUC from scikit-learn, computed on a fixed random sample of elements.
"""
from __future__ import annotations

import math
from pathlib import Path

SAMPLE = 2_000_000  # elements per release for the fallback's AUC


def mask_secrecy(release_dir, out_dir, private_dir, attacks) -> dict:
    try:
        from ..secrecy import run_attacks
        doc = run_attacks(str(release_dir), str(out_dir), private_dir=str(private_dir),
                          attacks=tuple(attacks))
    except ImportError:  # not installed (or not importable here): the stand-in
        return global_magnitude_auc(release_dir, private_dir)
    return {"source": "pmp_scale.secrecy.run_attacks",
            "attacks": {k: {"auc": v.get("auc")} for k, v in doc["attacks"].items()}}


def global_magnitude_auc(release_dir, private_dir) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from ..mask import read_artifact, unpack_bits
    from ..release import release_tensors
    masks, _ = read_artifact(Path(private_dir))
    scores, labels = [], []
    for name, t in release_tensors(Path(release_dir)):
        if name in masks:
            scores.append(t.float().abs().reshape(-1))
            labels.append(unpack_bits(masks[name], t.numel()))
    s, y = torch.cat(scores), torch.cat(labels)
    if s.numel() > SAMPLE:
        pick = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]
        s, y = s[pick], y[pick]
    auc = float(roc_auc_score(y.numpy().astype(np.int8), s.numpy())) \
        if 0 < int(y.sum()) < y.numel() else math.nan
    return {"source": "fallback: global |w| ROC AUC (pmp_scale.secrecy not installed)",
            "attacks": {"magnitude_global": {"auc": auc}}}
