"""The shadow-model attack: our code is public, so the attacker runs pmp_scale on public data,
gets releases *with* their masks, learns (per-element features → mask bit) and applies it to
the target. The strongest realistic attacker; every feature is something the target's
release and public text give away.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..launch import child_env, pretrain_command
from ..mask.artifact import read_artifact
from ..mask.bits import unpack_bits
from ..mask.kinds import NAMES as _KINDS, layer_kind
from . import stats
from .attacks import Attack, AttackError, Scores, Target, gradient_sums

REPO = Path(__file__).resolve().parents[2]
FEATURES = ["abs", "z_tensor", "z_row", "z_col", "zero_bits", "at_spike", "init_nll", "kind",
            "depth", "log_numel", "row_frac", "col_frac", "token_logfreq", "row_std_ratio",
            "col_std_ratio", "grad_abs", "fisher", "row_grad_abs", "col_grad_abs"]


def _depth(name: str, n_layers: int) -> float:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) / max(1, n_layers - 1) if m else -1.0


def grad_stats(target: Target, batches) -> tuple[dict, dict]:
    """Mean |g| and mean g² per element over the public batches."""
    k, g_abs, g_sq, _ = next(gradient_sums(target, batches, [len(batches)]))
    return {n: v / k for n, v in g_abs.items()}, {n: v / k for n, v in g_sq.items()}


class Featurizer:
    """Per-element feature rows of one release, one tensor at a time."""

    def __init__(self, target: Target, counts: torch.Tensor | None, grads: tuple | None):
        self.target = target
        self.counts = None if counts is None else torch.log1p(counts.float())
        self.grads = grads
        self.n_layers = getattr(target.hf_config(), "num_hidden_layers", 1)
        self.init = {n: (float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0)
                     for n, v in target.init_replay(seed=0)}

    def tensor(self, name: str, t: torch.Tensor) -> np.ndarray:
        numel, shape = t.numel(), tuple(t.shape)
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (numel, 1)
        r = torch.arange(numel) // cols
        c = torch.arange(numel) % cols
        vocab_rows = self.counts is not None and len(shape) == 2 and rows == self.counts.numel()
        cols_out = [stats.magnitude(t), stats.magnitude_tensor(t), stats.magnitude_row(t),
                    stats.magnitude_col(t), stats.trailing_zero_bits(t).float(),
                    -stats.constant_score(t), stats.init_likelihood(t, *self.init[name]),
                    torch.full((numel,), float(_KINDS.index(layer_kind(name)))),
                    torch.full((numel,), _depth(name, self.n_layers)),
                    torch.full((numel,), float(np.log(numel))),
                    r.float() / max(1, rows - 1), c.float() / max(1, cols - 1),
                    self.counts[r] if vocab_rows else torch.full((numel,), -1.0),
                    *_spread_vs_init(t, self.init[name][1], r, c)]
        if self.grads is not None:
            g = self.grads[0][name]
            cols_out += [g.reshape(-1), self.grads[1][name].reshape(-1), *_row_col_means(g, r, c)]
        return torch.stack([x.float() for x in cols_out], dim=1).numpy()


def _spread_vs_init(t: torch.Tensor, init_std: float, r, c) -> list[torch.Tensor]:
    """Row and column std of w over the init's std: a row (output unit, token) whose elements
    were mostly trained has drifted from the init's spread; one left frozen has not."""
    x = t.float()
    if x.dim() != 2 or init_std == 0:
        return [torch.ones(t.numel()), torch.ones(t.numel())]
    return [(x.std(1) / init_std)[r], (x.std(0) / init_std)[c]]


def _row_col_means(g: torch.Tensor, r, c) -> list[torch.Tensor]:
    """Row and column mean |g|: early-bird picks whole rows of frequent tokens / busy units."""
    if g.dim() != 2:
        return [g.reshape(-1), g.reshape(-1)]
    return [g.mean(1)[r], g.mean(0)[c]]


def train_shadow_run(config: Path, workdir: Path, overrides: list[str], ranks: int) -> Path:
    """The attacker's own PMP run through the project's launcher (reused when finished)."""
    run_dir = workdir / "run"
    if (run_dir / "private" / "mask" / "mask.json").is_file():
        return run_dir
    cmd = pretrain_command(config, ranks, [f"run_dir={run_dir}", *overrides])
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "shadow.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
    if proc.returncode != 0:
        tail = (workdir / "shadow.log").read_text().strip().splitlines()[-3:]
        raise AttackError(f"the shadow run failed (exit {proc.returncode}; log "
                          f"{workdir / 'shadow.log'}): {' | '.join(tail)}")
    return run_dir


def release_shadow(run_dir: Path, workdir: Path) -> tuple[Path, Path]:
    from ..release import release_checkpoint, resolve_checkpoint
    out, private = workdir / "release", run_dir / "private" / "mask"
    if not (out / "config.json").is_file():
        release_checkpoint(resolve_checkpoint(run_dir), out, private_dir=private, progress=False,
                           overwrite=True)
    return out, private


def shadow_attack(target: Target, shadow_release: Path, shadow_mask: Path,
                  counts=None, batches=None, train_cap: int = 300_000, seed: int = 0) -> Attack:
    """Fit a gradient-boosted classifier on the shadow release's elements, score the target's."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    shadow = Target(shadow_release)
    if shadow.shapes != target.shapes:
        diff = sorted(n for n in set(shadow.shapes) | set(target.shapes)
                      if shadow.shapes.get(n) != target.shapes.get(n))
        raise AttackError(f"the shadow release's architecture differs from the target's "
                          f"({len(diff)} tensors, e.g. {diff[0]}): use a shadow config with the "
                          "target's preset and overrides")
    masks, _ = read_artifact(shadow_mask)
    use_grads = batches is not None
    feats = Featurizer(shadow, counts, grad_stats(shadow, batches) if use_grads else None)
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) for s in shadow.shapes.values())
    xs, ys = [], []
    for name, t in shadow.tensors():
        x = feats.tensor(name, t)
        y = unpack_bits(masks[name], t.numel()).numpy()
        keep = rng.random(len(y)) < min(1.0, train_cap / total)
        xs.append(x[keep])
        ys.append(y[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    clf = HistGradientBoostingClassifier(max_iter=200, categorical_features=[FEATURES.index("kind")],
                                         random_state=seed).fit(x, y)
    target_feats = Featurizer(target, counts, grad_stats(target, batches) if use_grads else None)
    predicted: dict[str, torch.Tensor] = {}  # 4 bytes per element: predict once, score twice

    def scores() -> Scores:
        for name, t in target.tensors():
            if name not in predicted:
                x = target_feats.tensor(name, t)
                predicted[name] = torch.from_numpy(clf.predict_proba(x)[:, 1]).float()
            yield name, predicted[name]
    return Attack("shadow", "shadow run" + (" + public text" if use_grads else ""),
                  "shadow-model classifier", scores,
                  {"train_elements": len(y), "shadow_mask_share": float(y.mean()),
                   "features": FEATURES[:len(x[0])]})
