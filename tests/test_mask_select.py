"""Packed bits and exact distributed top-k, checked bit for bit against a gathered reference."""
import math

import numpy as np
import pytest
import torch

from helpers import run_distributed
from pmp_scale.mask import (iou, mask_counts, pack_bits, popcount, random_scores, topk_mask,
                            unpack_bits)
from pmp_scale.zero3.layout import LocalSlice

SIZES = [1, 2, 3, 1000, 4099, 5, 2048]  # 1, 2, 3 are smaller than the world size
N = sum(SIZES)
RANDOM_K = 3001
TIE_SEED = 424242
SECRET_CASES = ("ties", "all_equal", "bf16", "k0", "kN", "per_tensor_ties", "two_groups")


def _cases() -> dict:
    """name -> (full scores per parameter, k, groups); identical on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    split = lambda flat: list(torch.split(flat, SIZES))  # noqa: E731
    rand = torch.rand(N, generator=g)
    ties = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (N,), generator=g)]
    ties[::97] = float("nan")  # NaN counts as 0
    bf16 = (torch.rand(N, generator=g) * 1e-3).bfloat16()  # hundreds of ties per value
    per_tensor = list(range(len(SIZES)))
    return {
        "rand": (split(rand), 3000, None),
        "ties": (split(ties), N // 2, None),
        "all_equal": (split(torch.full((N,), 0.25)), 1234, None),
        "bf16": (split(bf16), 2500, None),
        "k0": (split(rand), 0, None),
        "kN": (split(ties), N, None),
        "per_tensor_ties": (split(ties), {i: round(0.7 * n) for i, n in enumerate(SIZES)}, per_tensor),
        "per_tensor_bf16": (split(bf16), {i: round(0.7 * n) for i, n in enumerate(SIZES)}, per_tensor),
        "two_groups": (split(bf16), {3: 3000, 7: 700}, [3, 7, 3, 7, 3, 7, 3]),
    }


def _select_on_rank(rank: int, world_size: int) -> dict:
    """Every case on this rank's ZeRO-3 slices; also a random mask, its count and an IoU."""
    slices = [LocalSlice.for_rank(i, n, rank, world_size) for i, n in enumerate(SIZES)]
    out = {}
    for name, (scores, k, groups) in _cases().items():
        local = [s[sl.start: sl.start + sl.length] for s, sl in zip(scores, slices)]
        out[name] = topk_mask(local, slices, k, groups)
        if name in SECRET_CASES:
            out["secret_" + name] = topk_mask(local, slices, k, groups, tie_seed=TIE_SEED)
    out["random_scores"] = random_scores(slices, seed=7)
    out["random"] = topk_mask(out["random_scores"], slices, RANDOM_K)
    out["random_count"] = mask_counts(out["random"])
    out["iou"] = iou([pack_bits(m) for m in out["rand"]], [pack_bits(m) for m in out["random"]])
    return out


def _full(results: list[dict], name: str) -> list[torch.Tensor]:
    """Per-parameter full results, concatenating the ranks' slices in rank order."""
    world = len(results)
    for rank, r in enumerate(results):
        assert [len(m) for m in r[name]] == [LocalSlice.for_rank(i, n, rank, world).length
                                            for i, n in enumerate(SIZES)]
    return [torch.cat([r[name][i] for r in results]) for i in range(len(SIZES))]


def _reference(scores, k, groups, tie_seed=None) -> list[torch.Tensor]:
    """Gathered top-k: sort by (-score, -secret tie score, global index), first k_g of each
    group; the tie score is splitmix64 of (tie_seed, (param << 40) + flat index), 24 bits."""
    flat = torch.cat([s.float() for s in scores]).nan_to_num(0.0).clamp(min=0.0).numpy()
    gid = torch.cat([torch.full((len(s),), g) for s, g in zip(scores, groups or [0] * len(scores))])
    ids = np.concatenate([(i << 40) + np.arange(len(s)) for i, s in enumerate(scores)])
    tie = (np.zeros(len(flat)) if tie_seed is None else
           (_splitmix64_numpy(tie_seed, ids) >> np.uint64(40)).astype(np.float64))
    out = torch.zeros(len(flat), dtype=torch.bool)
    for g, kg in ({0: k} if isinstance(k, int) else k).items():
        idx = (gid == g).nonzero().squeeze(1).numpy()
        order = np.lexsort((idx, -tie[idx], -flat[idx]))
        out[idx[order[:kg]]] = True
    return list(torch.split(out, SIZES))


def _check(results: list[dict]) -> None:
    for name, (scores, k, groups) in _cases().items():
        got, want = _full(results, name), _reference(scores, k, groups)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{name}: parameter {i} differs in {int((a != b).sum())} elements"
        if name in SECRET_CASES:
            got, want = _full(results, "secret_" + name), _reference(scores, k, groups, TIE_SEED)
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), f"secret {name}: parameter {i} differs"
    random_mask = torch.cat(_full(results, "random"))
    assert int(random_mask.sum()) == RANDOM_K
    assert all(r["random_count"] == RANDOM_K for r in results)
    a = torch.cat(_full(results, "rand"))
    want_iou = int((a & random_mask).sum()) / int((a | random_mask).sum())
    assert all(r["iou"] == pytest.approx(want_iou) for r in results)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_bits_matches_numpy(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bits(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy())))
    assert torch.equal(unpack_bits(packed, n), mask)
    assert popcount(packed) == int(mask.sum())


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="uint8\\[2\\]"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


def test_local_slice_follows_zero3_padding():
    assert [LocalSlice.for_rank(0, 10, r, 4) for r in range(4)] == [
        LocalSlice(0, 10, 0, 3), LocalSlice(0, 10, 3, 3), LocalSlice(0, 10, 6, 3), LocalSlice(0, 10, 9, 1)]
    # a rank can own only padding
    assert [LocalSlice.for_rank(5, 2, r, 4).length for r in range(4)] == [1, 1, 0, 0]


def test_topk_single_process_without_process_group():
    _check([_select_on_rank(0, 1)])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_topk_distributed_equals_gathered_reference(world_size):
    results = run_distributed(_select_on_rank, world_size)
    _check(results)
    single = _select_on_rank(0, 1)
    assert torch.equal(torch.cat(_full(results, "random")), torch.cat(single["random"]))
    assert torch.equal(torch.cat(_full(results, "random_scores")), torch.cat(single["random_scores"]))


def test_topk_rejects_k_above_group_size():
    slices = [LocalSlice.for_rank(0, 4, 0, 1)]
    with pytest.raises(ValueError, match="k exceeds"):
        topk_mask([torch.rand(4)], slices, 5)
    with pytest.raises(ValueError, match="missing k"):
        topk_mask([torch.rand(4)], slices, 2, groups=[1])


def _splitmix64_numpy(seed: int, ids: np.ndarray) -> np.ndarray:
    """Plain uint64 splitmix64, the specification random_scores implements with int64 ops."""
    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    with np.errstate(over="ignore"):
        stream = mix(np.array([seed], dtype=np.uint64))[0]
        return mix(ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + stream)


def test_random_scores_are_splitmix64_of_global_index():
    slices = [LocalSlice.for_rank(i, n, 1, 2) for i, n in enumerate([10, 3001])]
    offsets = [0, 10]
    got = torch.cat(random_scores(slices, seed=12345, param_offsets=offsets))
    ids = np.concatenate([np.arange(o + s.start, o + s.start + s.length) for o, s in zip(offsets, slices)])
    want = (_splitmix64_numpy(12345, ids) >> np.uint64(40)).astype(np.float32) / np.float32(2 ** 24)
    assert torch.equal(got, torch.from_numpy(want))
    assert 0.0 <= float(got.min()) and float(got.max()) < 1.0
    assert abs(float(got.mean()) - 0.5) < 0.03
    other_seed = torch.cat(random_scores(slices, seed=12346, param_offsets=offsets))
    assert not torch.equal(got, other_seed)


@pytest.mark.timeout(60)
def test_secret_tie_break_does_not_train_the_lowest_ids():
    """An embedding whose rows mostly have |g| = 0 (tokens absent from the batch), selected per
    tensor: ties by index would train the lowest token ids, a rule anyone can replay; secret
    random ties spread the selected zero rows over the whole vocabulary."""
    rows, dim = 512, 16
    g = torch.Generator().manual_seed(5)
    grad = torch.zeros(rows, dim)
    present = torch.randperm(rows, generator=g)[:100]  # 100 tokens in the check batch
    grad[present] = torch.rand(100, dim, generator=g) + 0.1
    slices = [LocalSlice.for_rank(0, rows * dim, 0, 1)]
    k = round(0.7 * rows * dim)
    zero_rows = sorted(set(range(rows)) - set(present.tolist()))
    n_zero_picked = k - 100 * dim

    def picked_zero_rows(tie_seed):
        m = topk_mask([grad.reshape(-1)], slices, k, tie_seed=tie_seed)[0].reshape(rows, dim)
        assert int(m.sum()) == k and bool(m[present].all())
        return torch.tensor([r for r in zero_rows if m[r].any()])

    by_index = picked_zero_rows(None)
    assert by_index.tolist() == zero_rows[:-(-n_zero_picked // dim)]  # the old leak, planted
    secret = picked_zero_rows(TIE_SEED)
    # the selected zero elements spread over the whole vocabulary, unlike the index prefix
    assert len(secret) > 0.95 * len(zero_rows)
    other = picked_zero_rows(TIE_SEED + 1)
    m1 = topk_mask([grad.reshape(-1)], slices, k, tie_seed=TIE_SEED)[0]
    m2 = topk_mask([grad.reshape(-1)], slices, k, tie_seed=TIE_SEED + 1)[0]
    assert len(other) > 0.95 * len(zero_rows) and not torch.equal(m1, m2)


def test_iou_of_empty_masks_is_one():
    empty = [pack_bits(torch.zeros(n, dtype=torch.bool)) for n in (3, 9)]
    assert iou(empty, empty) == 1.0
    a = [pack_bits(torch.tensor([True, True, False]))]
    b = [pack_bits(torch.tensor([True, False, True]))]
    assert iou(a, b) == pytest.approx(1 / 3)
    assert math.isclose(iou(a, a), 1.0)
