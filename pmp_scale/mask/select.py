"""Exact distributed top-k over ZeRO-3 partitions, random scores, mask statistics.

Every rank holds a slice of every parameter (zero3.layout.LocalSlice). The selection never gathers scores:
a radix select over the IEEE-754 bit patterns finds each group's threshold with one small
all-reduce per pass, and ties at the threshold are split with one more all-reduce of
per-(rank, parameter) tie counts: by secret random scores of the tied elements when a
`tie_seed` is given (a second exact top-k over the tied elements only), else by global element
index. The result is identical at any world size.

Why a secret tie-break: with many equal scores at the threshold (zero |g| of embedding rows
whose tokens were absent, `topk_scope: per_tensor`), index order trains the lowest token ids,
a rule anyone can replay without the mask.
"""
import torch
import torch.distributed as dist

from .bits import popcount_tensor
from ..zero3.layout import LocalSlice

# 31 bits: scores are made non-negative first, so the sign bit is always 0.
# Non-negative float32 bit patterns read as int32 are ordered like the floats.
_PASSES = ((20, 11), (10, 10), (0, 10))  # (shift, width) of each radix digit, high to low
_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # upcast to float32 is exact


def _rank_world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def _all_reduce(tensor: torch.Tensor, process_group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=process_group)
    return tensor


def _keys(score: torch.Tensor) -> torch.Tensor:
    """Monotone int32 keys; NaN and non-positive scores (including -0.0) become +0.0."""
    if score.dtype not in _SCORE_DTYPES or score.dim() != 1:
        raise TypeError(f"scores must be 1-D float32/bfloat16/float16, got {score.dtype} "
                        f"{tuple(score.shape)} (float64 would not survive float32 rounding exactly)")
    score = score.float()
    return torch.where(score > 0, score, 0.0).view(torch.int32)


def topk_mask(scores, slices, k, groups=None, process_group=None, tie_seed: int | None = None,
              param_offsets=None) -> list[torch.Tensor]:
    """Select exactly k_g elements per group: the largest scores; ties at the threshold go to
    the largest `uniform_scores(tie_seed)` of their global element index (param_offsets as in
    `random_scores`), or, without a tie_seed (and where those collide), to the lower global index.

    scores[i] holds this rank's slices[i].length elements of parameter slices[i].index. Every
    rank must pass the same parameters in the same order (zero-length slices included), which
    ZeRO-3 guarantees. groups[i] is the group of slices[i] (default: one group 0); k is an int
    (group 0) or {group: k_g}. Collectives: 3 all-reduces of a [groups, 2^11] histogram, plus
    one of a [world, params] tie-count matrix when some threshold ties must be split.
    """
    if len(scores) != len(slices):
        raise ValueError(f"{len(scores)} score tensors for {len(slices)} slices")
    groups = [0] * len(slices) if groups is None else list(groups)
    k = {0: k} if isinstance(k, int) else dict(k)
    group_ids = sorted(k)
    position = {g: j for j, g in enumerate(group_ids)}
    missing = sorted(set(groups) - set(position))
    if len(groups) != len(slices) or missing:
        raise ValueError(f"groups must name one group per slice, each with a k; missing k for {missing}")
    if any(v < 0 for v in k.values()):
        raise ValueError(f"k must be non-negative, got {k}")
    for s, sc in zip(slices, scores):
        if sc.numel() != s.length:
            raise ValueError(f"parameter {s.index}: {sc.numel()} scores for a slice of {s.length}")

    rank, world = _rank_world(process_group)
    device = scores[0].device if scores else torch.device("cpu")
    gpos = [position[g] for g in groups]
    keys = [_keys(sc) for sc in scores]
    k_rem = torch.tensor([k[g] for g in group_ids], dtype=torch.int64, device=device)
    prefix = torch.zeros_like(k_rem)
    cands = keys
    for p, (shift, width) in enumerate(_PASSES):
        hist = torch.zeros(len(group_ids), 1 << width, dtype=torch.int64, device=device)
        digit_mask = (1 << width) - 1
        for g, c in zip(gpos, cands):
            if c.numel():
                hist[g] += torch.bincount((c >> shift) & digit_mask, minlength=1 << width)
        _all_reduce(hist, process_group)
        if p == 0:
            total = hist.sum(dim=1)
            if bool((k_rem > total).any()):
                raise ValueError(f"k exceeds the group size: k={k_rem.tolist()}, "
                                 f"elements={total.tolist()} for groups {group_ids}")
        # Largest digit d with count(digit >= d) >= k_rem. With k_rem == 0 this is the all-ones
        # digit, so a k=0 group ends at threshold 0x7FFFFFFF (a NaN pattern no key has): nothing.
        at_least = hist.flip(1).cumsum(1).flip(1)
        digit = (at_least >= k_rem.unsqueeze(1)).sum(dim=1) - 1
        ties_total = hist.gather(1, digit.unsqueeze(1)).squeeze(1)  # candidates left, all ranks
        k_rem -= at_least.gather(1, digit.unsqueeze(1)).squeeze(1) - ties_total
        prefix = (prefix << width) | digit
        cands = [c[((c >> shift) & digit_mask) == digit[g]] for g, c in zip(gpos, cands)]

    # Keys above the threshold are in; k_rem[g] of the ties_total[g] keys equal to it are needed.
    threshold = prefix
    masks = [key > threshold[g] for g, key in zip(gpos, keys)]
    if bool((k_rem == ties_total).all()):
        return [m | (key == threshold[g]) for g, m, key in zip(gpos, masks, keys)]
    ties = torch.zeros(world, len(slices), dtype=torch.int64, device=device)
    ties[rank] = torch.tensor([c.numel() for c in cands], dtype=torch.int64)
    ties = _all_reduce(ties, process_group).cpu()
    if tie_seed is not None:
        return _split_ties_at_random(masks, keys, threshold, gpos, groups, group_ids, slices,
                                     ties, k_rem, rank, process_group, tie_seed, param_offsets)
    needed = k_rem.tolist()
    before = [0] * len(group_ids)  # ties of this group earlier in global order (param-major, then rank)
    for i in sorted(range(len(slices)), key=lambda i: slices[i].index):
        g = gpos[i]
        take = min(max(needed[g] - before[g] - int(ties[:rank, i].sum()), 0), int(ties[rank, i]))
        before[g] += int(ties[:, i].sum())
        if take:
            tied = keys[i] == threshold[g]
            tied[tied.cumsum(0, dtype=torch.int32) > take] = False
            masks[i] |= tied
    return masks


def _split_ties_at_random(masks, keys, threshold, gpos, groups, group_ids, slices, ties, k_rem,
                          rank, process_group, seed, param_offsets) -> list[torch.Tensor]:
    """Add k_rem[g] of each group's threshold ties, chosen by an exact top-k of their secret
    random scores. The tied elements of parameter i form a virtual slice (rank r holds the
    ties[r, i] of them after those of ranks < r: global element order), so the second select
    sees only the ties, never a full-size tensor, and is as layout-independent as the first."""
    stream = _stream(seed)
    tied_idx, sub_scores, sub_slices = [], [], []
    for i, (s, key) in enumerate(zip(slices, keys)):
        idx = (key == threshold[gpos[i]]).nonzero().squeeze(1)
        base = param_offsets[s.index] if param_offsets is not None else s.index << 40
        ids = idx.cpu().to(torch.int64) + (base + s.start)
        # [0.5, 1): 24 random bits survive float32 exactly, and every tie scores above 0
        sub_scores.append((_uniform(ids, stream) * 0.5 + 0.5).to(key.device))
        tied_idx.append(idx)
        sub_slices.append(LocalSlice(s.index, int(ties[:, i].sum()), int(ties[:rank, i].sum()),
                                     int(ties[rank, i])))
    need = dict(zip(group_ids, k_rem.tolist()))
    chosen = topk_mask(sub_scores, sub_slices, need, groups, process_group)
    for m, idx, c in zip(masks, tied_idx, chosen):
        m[idx[c]] = True
    return masks


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x &= _U64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping multiplication == uint64 arithmetic)."""
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def random_scores(slices, seed: int, param_offsets=None) -> list[torch.Tensor]:
    """Counter-based float32 scores in [0, 1): a hash of (seed, global element index).

    A score depends only on the element, never on the rank layout, so topk_mask of these
    scores is the same uniform random mask of exactly k elements at any world size. The global
    element index is param_offsets[index] + flat index, or (index << 40) + flat index by default.
    Scores have 24-bit resolution, like torch.rand; rare equal scores fall back to index order.
    """
    stream = _stream(seed)
    out = []
    for s in slices:
        base = param_offsets[s.index] if param_offsets is not None else s.index << 40
        ids = torch.arange(base + s.start, base + s.start + s.length, dtype=torch.int64)
        out.append(_uniform(ids, stream))
    return out


def _stream(seed: int) -> int:
    return int(_splitmix64(torch.tensor(_signed(seed))))


def _uniform(ids: torch.Tensor, stream: int) -> torch.Tensor:
    """float32 in [0, 1) with 24 random bits: a hash of (stream, global element id)."""
    return _shr(_splitmix64(ids * _signed(_GOLDEN) + stream), 40).float() * 2.0 ** -24


def mask_counts(masks, process_group=None) -> int:
    """Global number of selected elements over bool mask slices."""
    device = masks[0].device if masks else torch.device("cpu")
    local = torch.zeros(1, dtype=torch.int64, device=device)
    for m in masks:
        local += m.sum(dtype=torch.int64)
    return int(_all_reduce(local, process_group))


def iou(packed_a, packed_b, process_group=None) -> float:
    """|A∩B| / |A∪B| of two packed masks; padding bits are 0, so they never count. 1.0 if both empty."""
    device = packed_a[0].device if packed_a else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for a, b in zip(packed_a, packed_b, strict=True):
        counts += torch.stack([popcount_tensor(a & b), popcount_tensor(a | b)])
    inter, union = _all_reduce(counts, process_group).tolist()
    return inter / union if union else 1.0
