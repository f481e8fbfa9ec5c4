"""Stage I: early-bird mask discovery during dense warm-up, entirely on partitioned gradients.

Every `check_every` steps each element is scored by gradient magnitude (`step`: |g| of that
step, the paper's criterion; `ema`: a running mean of |g|; `accum`: the sum of |g| over the
last `score_window` steps before the check, a less noisy score that can reach a stable
mask where single-step |g| never does) and the candidate mask is the exact
top-k over all ranks (`select.topk_mask`: no rank ever sees another rank's scores). Discovery
stops when consecutive candidates agree (IoU ≥ threshold for `patience` checks in a row) or
at `warmup_max_steps`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import ds_internals
from .select import iou, random_scores, topk_mask
from ..zero3.layout import PartitionLayout
from .sharded import ShardedMask


def target_counts(layout: PartitionLayout, ratio: float, scope: str,
                  excluded: list[bool]) -> tuple[list[int] | None, dict[int, int]]:
    """Groups per trainable entry and k per group; k = round(ρ·N), N excluding padding."""
    trainable = [e for e, x in zip(layout.entries, excluded) if not x]
    if scope == "global":
        n = sum(e.slice.numel for e in trainable)
        return None, {0: math.floor(ratio * n + 0.5)}
    return ([e.slice.index for e in trainable],
            {e.slice.index: math.floor(ratio * e.slice.numel + 0.5) for e in trainable})


class MaskSelector:
    """Turns per-element scores into a ShardedMask with the run's ratio, scope and exclusions.

    `seed` (the run's secret mask seed) drives every random choice: ties at the threshold, and
    the secrecy defences (see README "Mask secrecy"): `placement: per_tensor_random` keeps each
    tensor's early-bird count and places it at random within the tensor; `core_fraction` f
    keeps the top f·k by score and draws the rest at random; `noise_epsilon` ε adds secret
    Laplace noise to the clipped log-score (bound AUC ≤ e^ε/(1+e^ε), docs/secrecy.md).
    Without a seed: ties by index, no defences (the selection of the tests' references).
    """

    def __init__(self, layout: PartitionLayout, ratio: float, scope: str, exclude: list[str],
                 device: torch.device | str = "cpu", seed: int | None = None,
                 secret_ties: bool = True, placement: str = "topk", core_fraction: float | None = None,
                 noise_epsilon: float | None = None, noise_clip: float = 4.0):
        self.layout = layout
        self.ratio = ratio
        self.device = device  # masks live here; collectives run here (NCCL: the GPU)
        self.excluded = layout.select(exclude)
        self.groups, self.k = target_counts(layout, ratio, scope, self.excluded)
        self.trainable = [i for i, x in enumerate(self.excluded) if not x]
        self.seed = seed
        self.secret_ties = secret_ties
        self.placement = placement
        self.core_fraction = (core_fraction if core_fraction is not None
                              else 0.0 if placement == "per_tensor_random" else 1.0)
        self.noise_epsilon, self.noise_clip = noise_epsilon, noise_clip

    @property
    def tie_seed(self) -> int | None:
        return self.seed if self.secret_ties else None

    def selectable(self) -> ShardedMask:
        """The elements that are selected at all: excluded ones are in every candidate, so an
        IoU counting them would be inflated. Derived when needed (Stage I checks only), not
        kept: the resident mask state stays 1 bit per element."""
        return ShardedMask.from_param_masks(self.layout, [
            torch.full((e.slice.length,), not x, dtype=torch.bool)
            for e, x in zip(self.layout.entries, self.excluded)], self.device)

    def from_scores(self, scores: list[torch.Tensor]) -> ShardedMask:
        """`scores[i]` for every layout entry (excluded entries ignored: always trainable)."""
        slices = [self.layout.entries[i].slice for i in self.trainable]
        local = [scores[i].to(self.device).float() for i in self.trainable]
        k = self.k if self.groups is not None else self.k[0]
        groups = self.groups
        defended = self.placement != "topk" or self.core_fraction < 1
        if self.seed is None and (defended or self.noise_epsilon is not None):
            raise ValueError("the mask defences draw from the run's secret seed: none given")
        if self.noise_epsilon is not None:
            local = noisy_log_scores(local, slices, groups, self.seed, self.noise_epsilon,
                                     self.noise_clip)
        chosen = topk_mask(local, slices, k, groups, tie_seed=self.tie_seed)
        if self.placement == "per_tensor_random":
            # keep each tensor's early-bird count; where inside the tensor is secret
            groups = [s.index for s in slices]
            k = dict(zip(groups, per_param_counts(chosen, self.device)))
        if defended:
            chosen = core_plus_random(local, slices, k, groups, self.core_fraction, self.seed,
                                      self.tie_seed)
        return self._assemble(chosen)

    def _assemble(self, chosen: list[torch.Tensor]) -> ShardedMask:
        masks = [torch.ones(e.slice.length, dtype=torch.bool, device=self.device)
                 for e in self.layout.entries]
        for i, m in zip(self.trainable, chosen):
            masks[i] = m
        return ShardedMask.from_param_masks(self.layout, masks, self.device)

    def random(self, seed: int) -> ShardedMask:
        """Uniform mask of exactly k elements, identical at any world size."""
        slices = [self.layout.entries[i].slice for i in self.trainable]
        scores = [s.to(self.device) for s in random_scores(slices, seed)]
        return self._assemble(topk_mask(scores, slices,
                                        self.k if self.groups is not None else self.k[0],
                                        self.groups))

    def full(self) -> ShardedMask:
        return ShardedMask.full(self.layout, self.device)

    def iou(self, a: ShardedMask, b: ShardedMask, selectable: ShardedMask | None = None) -> float:
        """IoU over the selectable elements (excluded parameters left out), over all ranks."""
        keep = (selectable or self.selectable()).bits
        return iou([x.to(self.device) & k for x, k in zip(a.bits, keep)],
                   [y.to(self.device) & k for y, k in zip(b.bits, keep)])


def per_param_counts(masks: list[torch.Tensor], device) -> list[int]:
    """Selected elements of each parameter, summed over ranks (one all-reduce)."""
    counts = torch.tensor([int(m.sum()) for m in masks], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts.tolist()


def core_plus_random(scores, slices, k, groups, fraction: float, seed: int,
                     tie_seed: int | None) -> list[torch.Tensor]:
    """Per group: the top round(f·k_g) by score (the core), then k_g − core more drawn
    uniformly (secret `seed`) from the rest: the core scores 2, every other element a
    random score in [0.5, 1), and one exact top-k picks core + the random rest."""
    kd = {0: k} if isinstance(k, int) else dict(k)
    core_k = {g: math.floor(fraction * v + 0.5) for g, v in kd.items()}
    core = topk_mask(scores, slices, core_k if groups is not None else core_k[0], groups,
                     tie_seed=tie_seed)
    # another stream than the tie-break's: the random part must not follow the ties' order
    rand = random_scores(slices, seed ^ _PLACEMENT_SALT)
    mixed = [torch.where(c, 2.0, r.to(c.device) * 0.5 + 0.5) for c, r in zip(core, rand)]
    return topk_mask(mixed, slices, k, groups, tie_seed=tie_seed)


_PLACEMENT_SALT = 0x5EC2E7_0001
_NOISE_SALT = 0x5EC2E7_0002


def noisy_log_scores(scores, slices, groups, seed: int, epsilon: float,
                     clip: float) -> list[torch.Tensor]:
    """D4: s = log|score| clipped to a window of width `clip` centred on the group's mean
    log-score (over non-zero scores), plus secret Laplace noise of scale 2·clip/ε, mapped
    monotonically into (0, 2) for the top-k. Any one swap of a selected and an unselected
    element changes the noise density by at most e^ε, hence AUC ≤ e^ε/(1+e^ε) for an attacker
    who knows every score exactly (docs/secrecy.md). The noise is a hash of (seed, global
    element index): the same at every check and at any world size."""
    gids = [0] * len(slices) if groups is None else list(groups)
    order = sorted(set(gids))
    device = scores[0].device if scores else torch.device("cpu")
    sums = torch.zeros(len(order), 2, dtype=torch.float64, device=device)
    logs = []
    for g, s in zip(gids, scores):
        x = s.double().abs()
        pos = (x > 0) & torch.isfinite(x)
        logs.append(torch.where(pos, x.clamp(min=1e-300).log(), float("-inf")))
        sums[order.index(g), 0] += logs[-1][pos].sum()
        sums[order.index(g), 1] += pos.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    centre = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    b = 2.0 * clip / epsilon
    rand = random_scores(slices, seed ^ _NOISE_SALT)
    out = []
    for g, x, u in zip(gids, logs, rand):
        c = centre[order.index(g)]
        u = u.double().to(x.device) + 2.0 ** -25  # (0, 1): both tails finite
        noise = -b * torch.sign(u - 0.5) * torch.log1p(-2.0 * (u - 0.5).abs())
        y = x.clamp(c - clip / 2, c + clip / 2) - c + noise
        out.append((1.0 + y / (1.0 + y.abs())).float())
    return out


def local_grad_slices(engine, layout: PartitionLayout) -> list[torch.Tensor]:
    """Views of each entry's real local elements in ZeRO-3's partitioned gradient buffer."""
    buf = ds_internals.grad_buffer(engine)
    starts = [0]
    for n in layout.sub_group_sizes:
        starts.append(starts[-1] + n)
    return [buf[starts[e.sub_group] + e.offset:starts[e.sub_group] + e.offset + e.slice.length]
            for e in layout.entries]


class EarlyBird:
    """The discovery state machine; its state is checkpointed so Stage I resumes exactly."""

    def __init__(self, selector: MaskSelector, *, score: str, check_every: int,
                 iou_threshold: float, patience: int, max_steps: int, ema_beta: float = 0.9,
                 score_window: int = 1):
        self.selector = selector
        self.score, self.check_every = score, check_every
        self.score_window = score_window
        self.acc: list[torch.Tensor] | None = None  # `accum`: |g| summed since the window began
        self.iou_threshold, self.patience, self.max_steps = iou_threshold, patience, max_steps
        self.ema_beta = ema_beta
        self.ema: list[torch.Tensor] | None = None
        self.candidate: ShardedMask | None = None
        # Every candidate (in host memory), for its IoU with the final mask.
        self.history: list[ShardedMask] = []
        self.streak = 0
        self.steps = 0
        self.trace: list[dict] = []
        self.stop_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @torch.no_grad()
    def observe(self, engine) -> dict | None:
        """Call at each Stage I accumulation boundary (gradients reduced, before the step)."""
        grads = local_grad_slices(engine, self.selector.layout)
        if self.score == "ema":
            mags = [g.float().abs() for g in grads]
            if self.ema is None:
                self.ema = mags
            else:
                for e, m in zip(self.ema, mags):
                    e.mul_(self.ema_beta).add_(m, alpha=1 - self.ema_beta)
        self.steps += 1
        if self.score == "accum" and (self.steps % self.check_every == 0 or self.steps % \
                                      self.check_every > self.check_every - self.score_window
                                      or self.steps >= self.max_steps):
            mags = [g.float().abs() for g in grads]
            self.acc = mags if self.acc is None else [a.add_(m) for a, m in zip(self.acc, mags)]
        record = None
        if self.steps % self.check_every == 0:
            scores = self._scores(grads)
            self.acc = None
            candidate = self.selector.from_scores(scores)
            record = {"step": self.steps, "iou_prev": None}
            if self.candidate is not None:
                value = self.selector.iou(self.candidate, candidate)
                record["iou_prev"] = value
                self.streak = self.streak + 1 if value >= self.iou_threshold else 0
            self.candidate = candidate
            self.history.append(candidate.to("cpu"))
            self.trace.append(record)
            if self.streak >= self.patience:
                self.stop_reason = "converged"
        if not self.done and self.steps >= self.max_steps:
            self.stop_reason = "step_limit"
            if self.candidate is None or self.steps % self.check_every:
                scores = self._scores(grads)
                self.candidate = self.selector.from_scores(scores)
                self.history.append(self.candidate.to("cpu"))
                self.trace.append({"step": self.steps, "iou_prev": None})
        return record

    def _scores(self, grads) -> list[torch.Tensor]:
        if self.score == "ema":
            return self.ema
        if self.score == "accum" and self.acc is not None:
            return self.acc
        return [g.float().abs() for g in grads]

    def finish(self) -> ShardedMask:
        """The final mask; fills in every candidate's IoU with it, then drops the history."""
        final = self.candidate
        keep = self.selector.selectable()
        for record, cand in zip(self.trace, self.history):
            record["iou_final"] = self.selector.iou(cand, final, keep)
        self.history = []
        self.ema = self.acc = None
        return final

    def state_dict(self) -> dict:
        return {"steps": self.steps, "streak": self.streak, "trace": self.trace,
                "stop_reason": self.stop_reason,
                "candidate": None if self.candidate is None else self.candidate.state_dict(),
                "history": [c.state_dict() for c in self.history],
                "ema": self.ema, "acc": self.acc}

    def load_state_dict(self, state: dict) -> None:
        layout = self.selector.layout
        self.steps, self.streak = state["steps"], state["streak"]
        self.trace, self.stop_reason = state["trace"], state["stop_reason"]
        self.candidate = (None if state["candidate"] is None else
                          ShardedMask.from_state_dict(layout, state["candidate"],
                                                      self.selector.device))
        self.history = [ShardedMask.from_state_dict(layout, s) for s in state["history"]]
        self.ema = (None if state["ema"] is None  # beside the gradients it is updated with
                    else [e.to(self.selector.device) for e in state["ema"]])
        self.acc = (None if state.get("acc") is None
                    else [a.to(self.selector.device) for a in state["acc"]])
