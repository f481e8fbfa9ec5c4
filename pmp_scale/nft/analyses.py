"""The paper's analyses, each writing one PNG and a JSON of its numbers.

    ratio_sweep      base quality and fine-tuning vs mask ratio ρ (one PMP release per ρ)
    mask_source      early-bird vs random mask at the same ρ (one release each)
    landscape        1-D loss landscape from the released weights along an authorized
                     (masked) direction vs an unauthorized (full-space) direction
    grad_hist        |gradient| histograms of masked vs unmasked elements + overlap coefficient

The first two fine-tune (the report's grid machinery: W=1 ZeRO-3 engine, cached cells, LR
selected by validation, test reported over seeds). The last two need one forward/backward on
the full model and run on a plain single-process PyTorch model (demo-scale models).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..mask import iou, read_artifact, unpack_bits
from ..finetune.config import FinetuneConfig
from ..data.prepare import read_prepared_tokens
from .report import base_quality, parse_report_config, run_grid
from .summary import save, style, subplots, summarise
from ..finetune.tasks import TaskData, build_task, load_hf_tokenizer


def _write(out: Path, name: str, fig, numbers: dict) -> dict:
    """The analysis' plot `<name>.png` and its numbers `<name>.json`."""
    numbers["plot"] = save(fig, out, f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(numbers, indent=1, default=float))
    return numbers


# --- fine-tuning comparisons ----------------------------------------------------------------------
BOTH_MODES = ("unauthorized", "authorized")


def _entries(named: list[tuple[str, str, str]], dense_release: str | None):
    """(name, release, mask) → report entries in both modes, plus the optional dense one."""
    entries = [dict(name=name, release=rel, mask=mask, modes=list(BOTH_MODES))
               for name, rel, mask in named]
    dense = (dict(name="dense", release=dense_release, modes=["unauthorized"])
             if dense_release else None)
    return entries, dense


def _grid(out: Path, finetune: str, entries: list[dict], dense: dict | None, lrs, steps, seeds,
          overrides=(), progress=True, min_seeds: int = 3) -> dict:
    """Run the report's grid over `entries` (ReleaseEntry fields) and the optional dense one;
    returns its summary."""
    from ..zero3 import ensure_process_group
    cfg = parse_report_config(dict(
        out_dir=str(out), finetune=str(Path(finetune).resolve()), overrides=list(overrides),
        releases=entries + ([dense] if dense else []), lrs=list(lrs), steps=list(steps),
        seeds=list(seeds), min_seeds=min_seeds, dense=dense["name"] if dense else "dense",
        pmp=entries[0]["name"]))
    ensure_process_group()
    return summarise(cfg, run_grid(cfg, Path("."), progress=progress))


def _best_at(summary: dict, name: str, mode: str, steps: int) -> dict | None:
    for row in summary["best"]:
        if (row["release"], row["mode"], row["steps"]) == (name, mode, steps):
            return row
    return None


def _by_mode(summary: dict, name: str, steps: int) -> dict:
    """Per mode: the selected LR's test metric, the metric before fine-tuning and the gain."""
    rows = {mode: _best_at(summary, name, mode, steps) for mode in BOTH_MODES}
    return {mode: {"test_mean": b["test_mean"], "test_std": b["test_std"], "lr": b["lr"],
                   "before_ft": b["before_mean"], "gain_mean": b["gain_mean"]}
            for mode, b in rows.items()}


def ratio_sweep(inputs: list[tuple[float, str, str]], out, finetune: str, lrs, steps, seeds,
                pretrain_data, dense_release: str | None = None, overrides=(), progress=True,
                min_seeds: int = 3, pretrain_eval_samples: int = 64) -> dict:
    """inputs: (ρ, release dir, mask dir). Per ρ: base quality (validation loss on the
    pre-training data `pretrain_data`, a prepared MDS dir) and the test metric after
    fine-tuning, per mode: the paper's trade-off is the two against each other."""
    out = Path(out)
    entries, dense = _entries([(f"rho{rho:g}", rel, mask) for rho, rel, mask in inputs],
                              dense_release)
    tokens = read_prepared_tokens(pretrain_data, "val", pretrain_eval_samples)
    base = {e["name"]: base_quality(e["release"], tokens) for e in entries + [dense] if e}
    summary = _grid(out, finetune, entries, dense, lrs, steps, seeds, overrides, progress,
                    min_seeds)
    d = max(steps)
    rows = [{"rho": rho, "release": rel, "mask": mask, "base": base[e["name"]],
             **_by_mode(summary, e["name"], d)} for (rho, rel, mask), e in zip(inputs, entries)]
    dense_row = _best_at(summary, "dense", "unauthorized", d) if dense else None
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    xs = [r["rho"] for r in rows]
    ax1.plot(xs, [r["base"]["loss"] for r in rows], marker="o", label="PMP release")
    if dense:
        ax1.axhline(base["dense"]["loss"], color="k", ls="--", label="dense release")
    for mode in BOTH_MODES:
        ax2.errorbar(xs, [r[mode]["test_mean"] for r in rows],
                     yerr=[r[mode]["test_std"] for r in rows], marker="o", capsize=3,
                     label=f"PMP {mode} FT")
    if dense_row:
        ax2.axhline(dense_row["test_mean"], color="k", ls="--", label="dense unauthorized FT")
    style(ax1, "mask ratio ρ", "validation loss, pre-training data",
          f"base quality ({len(tokens)} held-out sequences; lower is better)")
    style(ax2, "mask ratio ρ", f"test {summary['metric']} after {d} steps", "fine-tuning result")
    fig.suptitle("mask ratio: base quality vs fine-tuning")
    return _write(out, "ratio_sweep", fig, {
        "metric": summary["metric"], "steps": d, "rows": rows, "dense": dense_row,
        "dense_base": base.get("dense"), "pretrain_data": str(pretrain_data),
        "pretrain_eval_samples": len(tokens)})


def mask_iou(mask_a, mask_b) -> float | None:
    """IoU of two mask artifacts over all elements (None if they describe different shapes)."""
    (ta, ma), (tb, mb) = read_artifact(mask_a), read_artifact(mask_b)
    if ma["shapes"] != mb["shapes"]:
        return None
    return iou([ta[n] for n in ma["shapes"]], [tb[n] for n in ma["shapes"]])


def mask_source(inputs: list[tuple[str, str, str]], out, finetune: str, lrs, steps, seeds,
                dense_release: str | None = None, overrides=(), progress=True,
                min_seeds: int = 3) -> dict:
    """inputs: (label e.g. earlybird / random, release dir, mask dir), same ρ."""
    out = Path(out)
    entries, dense = _entries(inputs, dense_release)
    summary = _grid(out, finetune, entries, dense, lrs, steps, seeds, overrides, progress,
                    min_seeds)
    d = max(steps)
    rows = []
    for label, rel, mask in inputs:
        _, meta = read_artifact(mask)
        rows.append({"source": label, "release": rel, "mask": mask,
                     "rho": meta["total_selected"] / meta["total_numel"],
                     **_by_mode(summary, label, d)})
    iou = mask_iou(inputs[0][2], inputs[1][2]) if len(inputs) == 2 else None
    fig, ax = subplots(figsize=(6, 4))
    width = 0.25
    for j, key in enumerate(("before_ft", *BOTH_MODES)):
        vals = [r["unauthorized"]["before_ft"] if key == "before_ft" else r[key]["test_mean"]
                for r in rows]
        errs = [0 if key == "before_ft" else r[key]["test_std"] for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, yerr=errs, capsize=3,
               label={"before_ft": "before FT"}.get(key, f"{key} FT"))
    ax.set_xticks([i + width for i in range(len(rows))])
    ax.set_xticklabels([f"{r['source']}\nρ={r['rho']:.2f}" for r in rows])
    lo = min(min(r["unauthorized"]["test_mean"], r["authorized"]["test_mean"]) for r in rows)
    if summary["metric"] == "loss":
        ax.set_ylim(bottom=max(0, lo - 0.5))
    style(ax, "", summary["metric"], "early-bird vs random mask" +
          (f" (mask IoU {iou:.2f})" if iou is not None else ""), grid="y")
    return _write(out, "mask_source", fig, {"metric": summary["metric"], "steps": d,
                                            "rows": rows, "mask_iou": iou})


# --- analyses on the released weights -------------------------------------------------------------
def _plain_model(release, task: TaskData, seed: int):
    """The release as a plain PyTorch model for the task (new heads seeded)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    torch.manual_seed(seed)
    if task.kind == "lm":
        return AutoModelForCausalLM.from_pretrained(str(release), local_files_only=True,
                                                    dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(
        str(release), local_files_only=True, dtype=torch.float32, num_labels=task.num_labels,
        pad_token_id=task.pad_id)


def _full_masks(mask_dir, model) -> dict[str, torch.Tensor]:
    """name -> bool mask shaped like the parameter; parameters without one (a new head, which
    authorized fine-tuning trains fully): all True."""
    tensors, meta = read_artifact(mask_dir)
    out = {}
    for name, p in model.named_parameters():
        if name in tensors:
            if tuple(meta["shapes"][name]) != tuple(p.shape):
                from ..finetune.release_check import MaskMismatchError
                raise MaskMismatchError(f"mask does not match the model: {name!r} mask "
                                        f"{meta['shapes'][name]}, model {list(p.shape)}")
            out[name] = unpack_bits(tensors[name], p.numel()).view(p.shape)
        else:
            out[name] = torch.ones_like(p, dtype=torch.bool)
    return out


def _batches(task: TaskData, split: str, n_batches: int, batch_size: int, seed: int):
    n = task.size(split)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    for b in range(n_batches):
        idx = [order[(b * batch_size + i) % n] for i in range(batch_size)]
        yield task.collate(split, idx)


def task_gradient(model, task: TaskData, n_batches: int, batch_size: int, seed: int):
    """Mean gradient of the task's training loss over n_batches (plain model)."""
    model.train()
    model.zero_grad(set_to_none=True)
    for batch in _batches(task, "train", n_batches, batch_size, seed):
        (model(**batch).loss / n_batches).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@torch.no_grad()
def _loss(model, batches, params: dict[str, torch.Tensor]) -> float:
    """Mean loss over `batches` with the model's parameters replaced by `params`."""
    model.eval()
    total = count = 0.0
    for batch in batches:
        n = batch["input_ids"].shape[0]
        total += torch.func.functional_call(model, params, (), batch).loss.item() * n
        count += n
    return total / count


def _prepare(release, mask, finetune_cfg: FinetuneConfig, seed: int):
    from ..finetune.release_check import Release, check_mask
    rel = Release.open(release)
    check_mask(mask, rel, finetune_cfg.allow_unbound_mask)
    task = build_task(finetune_cfg.task, load_hf_tokenizer(rel.path))
    model = _plain_model(rel.path, task, seed)
    return rel, task, model, _full_masks(mask, model)


def landscape(release, mask, finetune_cfg: FinetuneConfig, out, radius: float = 1.0,
              random_radius: float = 0.5, points: int = 17, grad_batches: int = 8,
              eval_batches: int = 2, batch_size: int = 8, seed: int = 0) -> dict:
    """Validation loss along θ_release + α·d for unit-norm directions d: the task's negative
    gradient in the full space (unauthorized) and restricted to M (authorized), α ∈ [−radius,
    radius] in L2 units; and random Gaussian directions in each space, α ∈ ±random_radius·‖θ‖
    (the loss is flat on the gradient's scale in random directions)."""
    out = Path(out)
    _, task, model, masks = _prepare(release, mask, finetune_cfg, seed)
    names = list(masks)
    grads = task_gradient(model, task, grad_batches, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 7)
    directions = {
        "gradient, full space (unauthorized)": {n: -grads[n] for n in names},
        "gradient, inside M (authorized)": {n: -grads[n] * masks[n] for n in names},
        "random, full space": {n: torch.randn(masks[n].shape, generator=g) for n in names},
    }
    directions["random, inside M"] = {n: directions["random, full space"][n] * masks[n]
                                      for n in names}
    norms = {}
    for key, d in directions.items():
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))
        norms[key] = norm
        for n in names:
            d[n] = d[n] / norm
    eval_set = list(_batches(task, "validation", eval_batches, batch_size, seed))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    theta_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in theta.values()))
    unit = [2 * i / (points - 1) - 1 for i in range(points)]
    alphas = [radius * u for u in unit]
    random_alphas = [random_radius * theta_norm * u for u in unit]
    curves = {key: [_loss(model, eval_set, {n: theta[n] + a * d[n] for n in names})
                    for a in (alphas if key.startswith("gradient") else random_alphas)]
              for key, d in directions.items()}
    g_full = norms["gradient, full space (unauthorized)"]
    g_mask = norms["gradient, inside M (authorized)"]
    numbers = {"alphas": alphas, "random_alphas": random_alphas, "theta_norm": theta_norm,
               "curves": curves, "base_loss": curves[next(iter(curves))][points // 2],
               "gradient_norm_full": g_full, "gradient_norm_in_mask": g_mask,
               "gradient_energy_in_mask": (g_mask / g_full) ** 2 if g_full else float("nan"),
               "min_loss": {k: min(v) for k, v in curves.items()},
               "alpha_at_min": {k: (alphas if k.startswith("gradient") else random_alphas)[
                   v.index(min(v))] for k, v in curves.items()},
               "task": task.name, "radius": radius, "random_radius": random_radius}
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    for key, losses in curves.items():
        grad = key.startswith("gradient")
        (ax1 if grad else ax2).plot(alphas if grad else random_alphas, losses, marker=".",
                                    label=key)
    for ax, title in ((ax1, "along the task's negative gradient"),
                      (ax2, f"along random directions (‖θ‖ = {theta_norm:.1f})")):
        style(ax, "α (L2 distance from the release)", "validation loss", title)
    fig.suptitle(f"loss landscape from the release ({task.name}); ‖g_M‖²/‖g‖² = "
                 f"{numbers['gradient_energy_in_mask']:.3f}")
    return _write(out, "landscape", fig, numbers)


def overlap_coefficient(a: torch.Tensor, b: torch.Tensor, bins: int = 100,
                        lo: float | None = None, hi: float | None = None) -> tuple[float, dict]:
    """OVL = Σ min(p_a, p_b) over a common binning of the two samples (1 = identical
    distributions, 0 = disjoint), with the histograms."""
    lo = float(min(a.min(), b.min())) if lo is None else lo
    hi = float(max(a.max(), b.max())) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    ha = torch.histc(a.double(), bins=bins, min=lo, max=hi)
    hb = torch.histc(b.double(), bins=bins, min=lo, max=hi)
    pa, pb = ha / ha.sum(), hb / hb.sum()
    edges = torch.linspace(lo, hi, bins + 1)
    return float(torch.minimum(pa, pb).sum()), {"edges": edges.tolist(), "masked": pa.tolist(),
                                               "unmasked": pb.tolist()}


def grad_hist(release, mask, finetune_cfg: FinetuneConfig, out, grad_batches: int = 8,
              batch_size: int = 8, seed: int = 0, bins: int = 100) -> dict:
    """log10 |mean task gradient| at the released weights, masked vs unmasked elements."""
    from ..mask.kinds import layer_kind
    out = Path(out)
    rel, task, model, masks = _prepare(release, mask, finetune_cfg, seed)
    grads = task_gradient(model, task, grad_batches, batch_size, seed)
    tiny = 1e-30
    sel, rest, per_kind = [], [], {}
    for n, m in masks.items():
        if n not in grads or n not in rel.shapes:  # a new head is neither masked nor unmasked
            continue
        logg = torch.log10(grads[n].abs().float() + tiny).reshape(-1)
        mm = m.reshape(-1)
        sel.append(logg[mm])
        rest.append(logg[~mm])
        k = per_kind.setdefault(layer_kind(n), [[], []])
        k[0].append(logg[mm])
        k[1].append(logg[~mm])
    a, b = torch.cat(sel), torch.cat(rest)
    if b.numel() == 0:
        raise ValueError("the mask selects every element: nothing to compare")
    zero_a, zero_b = float((a <= math.log10(tiny) + 1).float().mean()), float(
        (b <= math.log10(tiny) + 1).float().mean())
    # exact zeros (e.g. embedding rows of tokens absent from the batches) are counted apart
    a_nz, b_nz = a[a > math.log10(tiny) + 1], b[b > math.log10(tiny) + 1]
    ovl, hist = overlap_coefficient(a_nz, b_nz, bins)
    kinds = {}
    for kind, (ka, kb) in per_kind.items():
        ka, kb = torch.cat(ka), torch.cat(kb)
        ka, kb = ka[ka > math.log10(tiny) + 1], kb[kb > math.log10(tiny) + 1]
        if ka.numel() and kb.numel():
            kinds[kind] = {"overlap": overlap_coefficient(ka, kb, bins)[0],
                           "median_log10_masked": float(ka.median()),
                           "median_log10_unmasked": float(kb.median()),
                           "n_masked": int(ka.numel()), "n_unmasked": int(kb.numel())}
    numbers = {"task": task.name, "overlap_coefficient": ovl,
               "n_masked": int(a.numel()), "n_unmasked": int(b.numel()),
               "zero_fraction_masked": zero_a, "zero_fraction_unmasked": zero_b,
               "median_log10_masked": float(a_nz.median()), "median_log10_unmasked": float(b_nz.median()),
               "per_kind": kinds, "histogram": hist}
    fig, ax = subplots(figsize=(7, 4))
    centers = [(x + y) / 2 for x, y in zip(hist["edges"][:-1], hist["edges"][1:])]
    width = hist["edges"][1] - hist["edges"][0]
    ax.bar(centers, hist["masked"], width, alpha=0.5,
           label=f"masked (in M), n={a.numel():,}; exactly 0: {zero_a:.1%}")
    ax.bar(centers, hist["unmasked"], width, alpha=0.5,
           label=f"unmasked, n={b.numel():,}; exactly 0: {zero_b:.1%}")
    style(ax, "log10 |gradient| (non-zero elements)", "fraction of elements",
          f"gradient magnitudes at the release ({task.name}): overlap {ovl:.3f}")
    return _write(out, "grad_hist", fig, numbers)
