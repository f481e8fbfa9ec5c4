"""The mechanism, measured: curvature of the loss along the mask and along its complement.

The paper's Proposition 1 says PMP leaves the masked weights at a conditional optimum with
sharp curvature along the frozen complement, so one global fine-tuning LR is either too small
for the mask or unstable along the complement. This measures it on a release: the top
eigenvalue of the Hessian restricted to an index set S (H_SS, by power iteration on
Hessian-vector products: exact second derivatives through autograd, never the matrix) and the
gradient's root-mean-square per element on S, for S = mask, complement, all weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def restricted_top_eigenvalue(loss_fn, params: list[torch.Tensor],
                              sets: list[torch.Tensor | None], iters: int = 30,
                              tol: float = 1e-4, seed: int = 0) -> dict:
    """Largest-magnitude eigenvalue of the Hessian of `loss_fn()` restricted to the elements
    where `sets[i]` is True (None: all of params[i]); also the gradient RMS per element there.
    Power iteration v <- P H P v / |.| (P: the projection on S) with the Rayleigh quotient."""
    sel = [torch.ones_like(p, dtype=torch.bool) if s is None else s.reshape(p.shape).bool()
           for p, s in zip(params, sets)]
    count = sum(int(s.sum()) for s in sel)
    if count == 0:
        return {"eig": math.nan, "grad_rms": math.nan, "elements": 0, "iters": 0,
                "converged": False}
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    grad_sq = sum(float(g.detach()[s].double().square().sum()) for g, s in zip(grads, sel))
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * s.to(p.device)
         for p, s in zip(params, sel)]
    norm = math.sqrt(sum(float(x.double().square().sum()) for x in v))
    v = [x / norm for x in v]
    eig, converged, it = math.nan, False, 0
    for it in range(1, iters + 1):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        hv = [h.detach() * s for h, s in zip(hv, sel)]
        new = sum(float((h.double() * x.double()).sum()) for h, x in zip(hv, v))
        norm = math.sqrt(sum(float(h.double().square().sum()) for h in hv))
        if norm == 0:
            eig, converged = 0.0, True
            break
        v = [h / norm for h in hv]
        if math.isfinite(eig) and abs(new - eig) <= tol * max(abs(new), 1e-12):
            eig, converged = new, True
            break
        eig = new
    return {"eig": eig, "grad_rms": math.sqrt(grad_sq / count), "elements": count,
            "iters": it, "converged": converged}


def mask_sets(mask_dir, names: list[str], shapes: dict, device="cpu") -> dict[str, torch.Tensor]:
    """{param name: bool tensor, True = in the mask (trainable)}; a parameter the artifact does
    not list (excluded: always trainable) is all mask."""
    from ..mask import read_artifact, unpack_bits
    masks, _ = read_artifact(Path(mask_dir))
    out = {}
    for n in names:
        numel = math.prod(shapes[n])
        out[n] = (unpack_bits(masks[n], numel).bool().reshape(shapes[n]) if n in masks
                  else torch.ones(shapes[n], dtype=torch.bool)).to(device)
    return out


def release_curvature(release_dir, mask_dir, tokens: torch.Tensor, iters: int = 30) -> dict:
    """Mask / complement / all: top eigenvalue and gradient RMS of the causal-LM loss of the
    release on `tokens` (fp32, one batch, dropout off)."""
    from transformers import AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # eager attention: the fused SDPA kernels have no second derivative (Hessian-vector products)
    model = AutoModelForCausalLM.from_pretrained(str(release_dir), local_files_only=True,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager").eval().to(device)
    tokens = tokens.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    inside = mask_sets(mask_dir, names, {n: tuple(p.shape) for n, p in named}, device)

    def loss_fn():
        return model(input_ids=tokens, labels=tokens).loss
    out = {}
    for what, sets in (("mask", [inside[n] for n in names]),
                       ("complement", [~inside[n] for n in names]),
                       ("all", [None] * len(names))):
        out[what] = restricted_top_eigenvalue(loss_fn, params, sets, iters=iters)
    return out
