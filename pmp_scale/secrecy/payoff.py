"""What a recovered mask is worth: authorized fine-tuning with it, against the true mask and
against plain (unauthorized) fine-tuning, same task, data order and budget."""
from __future__ import annotations

from pathlib import Path


def _gain(result: dict) -> tuple[float, float]:
    before = result["at"]["0"]["test"]["loss"]
    after = result["final"]["test"]["loss"]
    return before, after


def payoff(config, release_dir, private_dir, masks_dir: Path, suite: dict) -> dict:
    """Fine-tune three ways: unauthorized, the true mask, the best attack's recovered mask."""
    from ..finetune.config import load_finetune_config
    from ..finetune.train import finetune
    scored = [(max(r["auc"], 1 - r["auc"]), n) for n, r in suite["attacks"].items()
              if r.get("auc") is not None]
    best = max(scored)[1]
    runs = [("unauthorized", "unauthorized", None),
            ("authorized, true mask", "authorized", Path(private_dir)),
            (f"authorized, {best}'s mask", "authorized", masks_dir / best.replace("@", "_"))]
    out = {"best_attack": best, "runs": []}
    for label, mode, mask in runs:
        sets = [f"release={release_dir}", f"mode={mode}", "out_dir=null", "export.dir=null"]
        if mask is not None:
            sets += [f"mask={mask}", "allow_unbound_mask=true"]
        cfg = load_finetune_config(config, sets)
        before, after = _gain(finetune(cfg))
        out["runs"].append({"label": label, "mask": None if mask is None else str(mask.name),
                            "before": before, "after": after, "gain": before - after})
        out.update(task=cfg.task.name, steps=cfg.train.max_steps, lr=cfg.optim.lr)
    return out
