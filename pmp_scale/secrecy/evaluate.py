"""Scoring an attack against the true mask, and turning its scores into a predicted mask.

Memory stays bounded at any model size: scores arrive one tensor at a time; the global ROC
AUC, the per-group AUCs and precision/recall are computed on a uniform random sample of at most
`sample_cap` elements (exact when the model is smaller), per-tensor AUCs on at most
`tensor_cap` elements of each tensor. Positive class = in the mask M (trained).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from .. import chunking
from ..mask.bits import pack_bits, unpack_bits
from ..mask.kinds import NAMES as KIND_NAMES, layer_kind
from .attacks import Attack, AttackError

# The audit's rule: an attack fails the release when it reaches this on a group of at least
# GROUP_SHARE of the elements, or TENSOR_AUC on any one tensor (AUC oriented either way).
GROUP_AUC, GROUP_SHARE, TENSOR_AUC = 0.75, 0.01, 0.9

MIN_CLASS = 100  # elements of each class a tensor needs for its own AUC to mean anything
TOP_SHARE = 0.1  # precision of the attacker's most confident tenth
ATTACKER_RATIOS = (0.1, 0.3)  # shares an attacker may fine-tune with (and the true ρ)


def folded(auc: float | None) -> float | None:
    """An AUC read either way: a score that ranks the mask consistently backwards is as useful
    to an attacker (a shadow model learns the orientation). 0.5 = chance, 1 = exact. Every
    verdict on an attack (the audit, the claims, the payoff's choice) compares this."""
    return None if auc is None else max(auc, 1.0 - auc)


def inverted(auc: float | None) -> bool:
    """Whether the score works backwards: its predicted mask is then built from -score."""
    return auc is not None and auc < 0.5


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def _bernoulli(numel: int, p: float, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """rand(numel) < p in chunks of chunking.CHUNK (the same stream as one draw), so that no float
    or bool temporary is the size of the tensor."""
    for start in range(0, numel, chunking.CHUNK):
        yield torch.rand(min(chunking.CHUNK, numel - start), generator=gen) < p


def _keep(numel: int, frac: float, gen: torch.Generator) -> torch.Tensor | None:
    """Indices of a Bernoulli(frac) sample of the elements (None: all of them)."""
    if frac >= 1:
        return None
    return torch.cat([chunk.nonzero().squeeze(1) + i * chunking.CHUNK
                      for i, chunk in enumerate(_bernoulli(numel, frac, gen))])


def _labels(packed: torch.Tensor, numel: int, idx: torch.Tensor | None) -> torch.Tensor:
    """Mask bits at `idx` (all when None), read from the packed bytes without unpacking all."""
    if idx is None:
        return unpack_bits(packed, numel)
    return (packed[idx >> 3] >> (7 - (idx & 7)).to(torch.uint8)) & 1 == 1


class Sample:
    """A uniform sample of (score, label, group) over the whole model, plus per-tensor AUCs."""

    def __init__(self, attack: Attack, shapes: Mapping[str, tuple], masks: Mapping | None,
                 sample_cap: int = 1_000_000, tensor_cap: int = 100_000, seed: int = 0):
        total = sum(math.prod(s) for s in shapes.values())
        frac = min(1.0, sample_cap / total)
        gen = torch.Generator().manual_seed(seed)
        scores, labels, groups, self.tensor_auc, seen = [], [], [], {}, set()
        quantiles = []
        self.group_size = defaultdict(int)
        for name, s in attack.scores():
            if name not in shapes:
                raise AttackError(f"attack {attack.name}: parameter {name} is not in the release")
            seen.add(name)
            s = s.reshape(-1).float()
            numel = s.numel()
            self.group_size[layer_kind(name)] += numel
            if masks is not None:
                k = _keep(numel, tensor_cap / numel, gen)
                sub_m, sub_s = _labels(masks[name], numel, k), s if k is None else s[k]
                if min(int(sub_m.sum()), int((~sub_m).sum())) >= MIN_CLASS:
                    self.tensor_auc[name] = _auc(sub_m.numpy(), sub_s.numpy())
            k = _keep(numel, frac, gen)
            scores.append((s if k is None else s[k]).numpy())
            quantiles.append(_quantiles(scores[-1]))
            if masks is not None:
                labels.append(_labels(masks[name], numel, k).numpy())
            code = KIND_NAMES.index(layer_kind(name))
            groups.append(np.full(numel if k is None else len(k), code, dtype=np.int8))
            del s  # before the next tensor is read
        if seen != set(shapes):
            raise AttackError(f"attack {attack.name} scored {len(seen)} of {len(shapes)} tensors")
        self.total = total
        self.scores = np.concatenate(scores)
        self.quantiles = np.concatenate(quantiles)
        self.labels = np.concatenate(labels).astype(np.int8) if labels else None
        self.groups = np.concatenate(groups)

    def threshold(self, ratio: float, invert: bool = False) -> tuple[float, float]:
        """Score threshold selecting a fraction `ratio` of elements, and the probability with
        which elements tied at it are selected (scores with many ties: bits, constants).
        `invert`: of the negated scores (see `inverted`)."""
        scores = -self.scores if invert else self.scores
        n_select = ratio * len(scores)
        ordered = np.sort(scores)[::-1]
        thr = float(ordered[min(len(ordered) - 1, max(0, int(round(n_select)) - 1))])
        above, tied = float((scores > thr).sum()), float((scores == thr).sum())
        return thr, min(1.0, max(0.0, (n_select - above) / tied)) if tied else 1.0

    def evaluate(self) -> dict:
        """ROC AUC (global, per layer group, per tensor), precision/recall at the true |M̄|."""
        y, s = self.labels, self.scores
        auc = _auc(y, s)
        groups = {}
        for code in np.unique(self.groups):
            sel, g = self.groups == code, KIND_NAMES[code]
            groups[g] = {"share": self.group_size[g] / self.total, "auc": _auc(y[sel], s[sel])}
        # Predict the complement as the |M̄| lowest scores (random order among ties).
        n_comp = int((y == 0).sum())
        order = np.lexsort((np.random.default_rng(0).random(len(s)), s))
        predicted = np.zeros(len(s), dtype=bool)
        predicted[order[:n_comp]] = True
        hit = int((predicted & (y == 0)).sum())
        fpr, tpr = _roc_points(y, s)
        # the attacker's most confident tenth, oriented: how many of its picks are trained
        oriented = -s if inverted(auc) else s
        top = np.lexsort((np.random.default_rng(1).random(len(s)), -oriented))
        top = top[:max(1, int(round(TOP_SHARE * len(s))))]
        auc_q = _auc(y, self.quantiles)
        return {"auc": auc, "auc_sym": folded(auc), "inverted": inverted(auc),
                "auc_quantile": auc_q, "auc_quantile_sym": folded(auc_q),
                "precision_at_top10": float(y[top].mean()), "mask_share": float(y.mean()),
                "groups": groups, "tensors": self.tensor_auc,
                "precision_at_true_size": hit / max(1, int(predicted.sum())),
                "recall_at_true_size": hit / max(1, n_comp),
                "complement_share": n_comp / len(y), "sampled": len(y), "total": self.total,
                "roc": {"fpr": fpr, "tpr": tpr}}


def _quantiles(scores: np.ndarray) -> np.ndarray:
    """Each score's rank within its own tensor, mapped to [0, 1] (ties: their mean rank), so
    that pooling tensors of different scales compares like with like."""
    if len(scores) < 2:
        return np.full(len(scores), 0.5, dtype=np.float32)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - counts + (counts - 1) / 2.0  # 0-based, ties averaged
    return (mean_rank[inverse] / (len(scores) - 1)).astype(np.float32)


def _roc_points(y, s, n: int = 200) -> tuple[list[float], list[float]]:
    from sklearn.metrics import roc_curve
    if y.min() == y.max():
        return [], []
    fpr, tpr, _ = roc_curve(y, s)
    idx = np.unique(np.linspace(0, len(fpr) - 1, min(n, len(fpr))).astype(int))
    return fpr[idx].round(5).tolist(), tpr[idx].round(5).tolist()


def predicted_mask(attack: Attack, sample: Sample | None, ratio: float,
                   shapes: Mapping[str, tuple], seed: int = 0, invert: bool = False,
                   threshold: tuple[float, float] | None = None):
    """(name, packed, shape) of the mask the attacker would use: the top-`ratio` scores, of
    -score when `invert` (an inverted winner's mask is oriented, never the anti-mask).
    `threshold`: one computed earlier by `sample.threshold(ratio, invert)`."""
    thr, p_tied = threshold or sample.threshold(ratio, invert)
    gen = torch.Generator().manual_seed(seed)
    for name, s in attack.scores():
        s = s.reshape(-1).float()
        if invert:
            s = -s
        ties = _bernoulli(s.numel(), p_tied, gen)
        packed = [pack_bits((c > thr) | ((c == thr) & next(ties)))  # CHUNK is a multiple of 8
                  for _, c in chunking.chunks(s)]
        del s
        yield name, torch.cat(packed) if packed else pack_bits(torch.zeros(0, dtype=torch.bool)), \
            tuple(shapes[name])
