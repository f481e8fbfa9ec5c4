"""What a recovered mask is worth: authorized fine-tuning with it, against the true mask and
against plain (unauthorized) fine-tuning, same task, data order and budget.

An attacker need not use a mask of the true size: fine-tuning only its most confident 10 or
30 % may be worth more than a full-size guess, so the best attack is tried at each of
`evaluate.ATTACKER_RATIOS` and at the true ρ.
"""
from __future__ import annotations

from pathlib import Path

from .evaluate import folded


def _gain(result: dict) -> tuple[float, float]:
    before = result["at"]["0"]["test"]["loss"]
    after = result["final"]["test"]["loss"]
    return before, after


def best_attack(suite: dict) -> str:
    """The attack with the highest folded AUC (an inverted winner counts, oriented)."""
    scored = [(folded(r["auc"]), n) for n, r in suite["attacks"].items()
              if r.get("auc") is not None]
    return max(scored)[1]


def payoff(config, release_dir, private_dir, best: str, masks: dict[float, Path]) -> dict:
    """Fine-tune unauthorized, with the true mask, and with `best`'s oriented predicted mask
    at each attacker ratio in `masks` ({ratio: mask dir})."""
    from ..finetune.config import load_finetune_config
    from ..finetune.train import finetune
    runs = [("unauthorized", "unauthorized", None, None),
            ("authorized, true mask", "authorized", Path(private_dir), None)]
    runs += [(f"authorized, {best}'s top {r:.0%}", "authorized", m, r)
             for r, m in sorted(masks.items())]
    out = {"best_attack": best, "runs": []}
    for label, mode, mask, ratio in runs:
        sets = [f"release={release_dir}", f"mode={mode}", "out_dir=null", "export.dir=null"]
        if mask is not None:
            sets += [f"mask={mask}", "allow_unbound_mask=true"]
        cfg = load_finetune_config(config, sets)
        before, after = _gain(finetune(cfg))
        out["runs"].append({"label": label, "mask": None if mask is None else str(mask.name),
                            "attacker_ratio": ratio, "before": before, "after": after,
                            "gain": before - after})
        out.update(task=cfg.task.name, steps=cfg.train.max_steps, lr=cfg.optim.lr)
    return out
