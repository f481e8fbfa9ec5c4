"""Stage I state machine (EarlyBird + MaskSelector) on synthetic partitioned gradients.

Single process, W=1: the selection code is the real one; only the engine is reduced to the one
attribute discovery reads (ZeRO-3's flat partitioned gradient buffer).
"""
from types import SimpleNamespace

import pytest
import torch

from pmp_scale.mask.discovery import EarlyBird, MaskSelector
from pmp_scale.zero3.layout import LocalSlice, ParamEntry, PartitionLayout

SHAPES = {"model.embed_tokens.weight": (40, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
          "model.norm.weight": (8,), "lm_head.weight": (40, 8)}


def _layout() -> PartitionLayout:
    """Two sub-groups, like ZeRO-3 with a small sub_group_size; W=1 so no padding."""
    entries, sizes, offset, group = [], [0, 0], 0, 0
    for i, (name, shape) in enumerate(SHAPES.items()):
        n = torch.Size(shape).numel()
        if i == 2:
            group, offset = 1, 0
        entries.append(ParamEntry(name, shape, LocalSlice.for_rank(i, n, 0, 1), group, offset, n))
        offset += n
        sizes[group] = offset
    return PartitionLayout(entries, sizes, 0, 1)


N = sum(torch.Size(s).numel() for s in SHAPES.values())


def _engine(grads: torch.Tensor):
    return SimpleNamespace(optimizer=SimpleNamespace(grad_partitions_flat_buffer=grads))


def _reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Largest k scores, ties by lower index: a stable sort of the whole vector."""
    order = torch.sort(-scores.float(), stable=True).indices
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


def _flat(mask) -> torch.Tensor:
    return torch.cat([mask.sub_group(g) for g in range(len(mask.bits))])


def _bird(selector, **kw):
    args = dict(score="step", check_every=2, iou_threshold=0.99, patience=2, max_steps=20)
    return EarlyBird(selector, **{**args, **kw})


def test_converges_after_patience_agreeing_checks_and_keeps_exact_topk():
    selector = MaskSelector(_layout(), 0.7, "global", [])
    bird = _bird(selector)
    fixed = torch.rand(N, generator=torch.Generator().manual_seed(0))
    steps = 0
    while not bird.done:
        bird.observe(_engine(fixed * (-1) ** steps))  # sign flips: |g| identical each step
        steps += 1
    assert bird.stop_reason == "converged" and bird.steps == 6  # checks at 2, 4, 6
    assert [r["iou_prev"] for r in bird.trace] == [None, 1.0, 1.0]
    final = bird.finish()
    assert torch.equal(_flat(final), _reference_topk(fixed.abs(), round(0.7 * N)))
    assert [r["iou_final"] for r in bird.trace] == [1.0, 1.0, 1.0]


def test_changing_scores_stop_at_the_step_limit_with_the_last_checks_topk():
    selector = MaskSelector(_layout(), 0.5, "global", [])
    bird = _bird(selector, max_steps=7)
    g = torch.Generator().manual_seed(1)
    last = None
    for _ in range(7):
        last = torch.randn(N, generator=g)
        bird.observe(_engine(last))
    assert bird.done and bird.stop_reason == "step_limit" and bird.steps == 7
    # the limit fell between checks: one more candidate from the last step's |g|
    assert [r["step"] for r in bird.trace] == [2, 4, 6, 7]
    assert all(r["iou_prev"] is None or r["iou_prev"] < 0.99 for r in bird.trace)
    final = bird.finish()
    assert torch.equal(_flat(final), _reference_topk(last.abs(), round(0.5 * N)))
    assert bird.trace[-1]["iou_final"] == 1.0 and bird.trace[0]["iou_final"] < 1.0


def _feed(bird, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` random gradients observed in order; returned for the reference computation."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(N, generator=gen) for _ in range(steps)]
    for grad in grads:
        bird.observe(_engine(grad))
    return grads


def test_ema_score_is_the_running_mean_of_abs_grad():
    selector = MaskSelector(_layout(), 0.6, "global", [])
    bird = _bird(selector, score="ema", check_every=3, ema_beta=0.5, max_steps=3)
    grads = _feed(bird, 3, seed=2)
    ema = grads[0].abs()
    for grad in grads[1:]:
        ema = 0.5 * ema + 0.5 * grad.abs()
    final = bird.finish()
    assert torch.equal(_flat(final), _reference_topk(ema, round(0.6 * N)))
    assert not torch.equal(_flat(final), _reference_topk(grads[-1].abs(), round(0.6 * N)))


def test_exclusions_are_always_selected_and_left_out_of_k_and_iou():
    layout = _layout()
    selector = MaskSelector(layout, 0.5, "per_tensor", ["*embed*", "*norm*"])
    grads = torch.rand(N, generator=torch.Generator().manual_seed(3))
    bird = _bird(selector, check_every=1, max_steps=2)
    bird.observe(_engine(grads))
    # new scores for the excluded embedding only: the candidate is unchanged
    moved = grads.clone()
    moved[:320] = torch.rand(320)
    bird.observe(_engine(moved))
    assert bird.trace[1]["iou_prev"] == 1.0
    mask = bird.finish()
    for e, m in zip(layout.entries, mask.param_masks()):
        if "embed" in e.name or "norm" in e.name:
            assert m.all(), e.name
        else:
            assert int(m.sum()) == round(0.5 * e.slice.numel), e.name
    # IoU counts selectable elements only: with the always-selected exclusions counted, two
    # candidates that disagree (reversed up_proj scores) would look more alike than they are
    other = grads.clone()
    start = 320
    other[start:start + 128] = 1 - other[start:start + 128]
    a, b = selector.from_scores(_split(layout, grads)), selector.from_scores(_split(layout, other))
    inter = (_flat(a) & _flat(b)).sum().item()
    union = (_flat(a) | _flat(b)).sum().item()
    excluded = 320 + 8
    assert selector.iou(a, b) == pytest.approx((inter - excluded) / (union - excluded))
    assert selector.iou(a, b) < inter / union


def _split(layout, flat):
    out, offset = [], 0
    for e in layout.entries:
        out.append(flat[offset:offset + e.slice.numel])
        offset += e.slice.numel
    return out


def test_accum_score_sums_abs_grad_over_the_window_before_each_check():
    """`accum`: the candidate at a check is the top-k of Σ|g| over the last `score_window`
    steps (earlier steps of the period do not count), and the sum restarts after the check."""
    selector = MaskSelector(_layout(), 0.5, "global", [])
    bird = _bird(selector, score="accum", check_every=4, score_window=2, patience=5)
    grads = _feed(bird, 8, seed=3)
    k = round(0.5 * N)
    assert torch.equal(_flat(bird.candidate), _reference_topk(grads[6].abs() + grads[7].abs(), k))
    assert bird.acc is None and [t["step"] for t in bird.trace] == [4, 8]
    first = bird.history[0]
    assert torch.equal(_flat(first), _reference_topk(grads[2].abs() + grads[3].abs(), k))


def test_accum_window_longer_than_the_check_interval_is_refused():
    from pmp_scale.config import PMPConfig
    with pytest.raises(ValueError, match=r"pmp.score_window \(6\) exceeds pmp.check_every \(5\)"):
        PMPConfig(enabled=True, score="accum", score_window=6, check_every=5)
