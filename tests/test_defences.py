"""Mask-secrecy defences in the selector (D2 per-tensor random placement, D3 early-bird core,
D4 noisy top-k): exact on ZeRO-3 slices at any world size, checked against a gathered
reference, and each doing what it promises on planted scores."""
import math

import numpy as np
import pytest
import torch

from helpers import run_distributed
from pmp_scale.mask.discovery import MaskSelector, _NOISE_SALT, _PLACEMENT_SALT
from pmp_scale.zero3.layout import LocalSlice, ParamEntry, PartitionLayout
from test_mask_select import _splitmix64_numpy

SHAPES = {"embed": (64, 16), "up": (32, 16), "tiny": (3,), "down": (16, 32)}
SIZES = [math.prod(s) for s in SHAPES.values()]
SEED = 2024


def _layout(rank: int, world: int) -> PartitionLayout:
    """One ZeRO-3 sub-group holding each parameter's padded partition P = ceil(n/W)."""
    entries, offset = [], 0
    for i, (name, shape) in enumerate(SHAPES.items()):
        n = math.prod(shape)
        part = -(-n // world)
        entries.append(ParamEntry(name, shape, LocalSlice.for_rank(i, n, rank, world), 0,
                                  offset, part))
        offset += part
    return PartitionLayout(entries, [offset], rank, world)


def _scores() -> list[torch.Tensor]:
    """|g|-like scores with a zero block (absent tokens) and repeated values: ties matter."""
    g = torch.Generator().manual_seed(0)
    out = [torch.rand(n, generator=g).pow(3) for n in SIZES]
    out[0][: 16 * 40] = 0.0
    out[1] = (out[1] * 8).round() / 8
    return out


CASES = {"core": dict(core_fraction=0.5), "core_per_tensor": dict(core_fraction=0.3),
         "placement": dict(placement="per_tensor_random"),
         "placement_core": dict(placement="per_tensor_random", core_fraction=0.5),
         "noisy": dict(noise_epsilon=1.0), "noisy_placement": dict(noise_epsilon=2.0,
                                                                    placement="per_tensor_random")}


def _select(rank: int, world: int) -> dict:
    layout = _layout(rank, world)
    full = _scores()
    local = [s[e.slice.start:e.slice.start + e.slice.length] for s, e in zip(full, layout.entries)]
    out = {}
    for name, kw in CASES.items():
        scope = "per_tensor" if name == "core_per_tensor" else "global"
        sel = MaskSelector(layout, 0.6, scope, [], seed=SEED, **kw)
        out[name] = sel.from_scores(local).param_masks()
    return out


def _gather(results: list[dict], name: str) -> list[torch.Tensor]:
    return [torch.cat([r[name][i] for r in results]) for i in range(len(SIZES))]


def _hash(salt_seed: int) -> np.ndarray:
    ids = np.concatenate([(i << 40) + np.arange(n) for i, n in enumerate(SIZES)])
    return (_splitmix64_numpy(salt_seed, ids) >> np.uint64(40)).astype(np.float64)


def _topk(primary: np.ndarray, k: dict, gid: np.ndarray) -> np.ndarray:
    """Largest primary per group; ties by the secret tie hash, then by index."""
    tie, out = _hash(SEED), np.zeros(len(primary), dtype=bool)
    for g, kg in k.items():
        idx = np.nonzero(gid == g)[0]
        out[idx[np.lexsort((idx, -tie[idx], -primary[idx]))[:kg]]] = True
    return out


def _reference(name: str) -> list[torch.Tensor]:
    """D2/D3 gathered: top-k; per-tensor counts (D2); core of round(f·k_g) by score, the rest
    by the placement hash among the others."""
    kw = CASES[name]
    flat = torch.cat(_scores()).double().numpy()
    pid = np.concatenate([np.full(n, i) for i, n in enumerate(SIZES)])
    per_tensor = name == "core_per_tensor"
    gid = pid if per_tensor else np.zeros(len(flat), dtype=int)
    k = ({i: math.floor(0.6 * n + 0.5) for i, n in enumerate(SIZES)} if per_tensor
         else {0: math.floor(0.6 * len(flat) + 0.5)})
    chosen = _topk(flat, k, gid)
    f = kw.get("core_fraction", 0.0 if kw.get("placement") else 1.0)
    if kw.get("placement") == "per_tensor_random":
        gid, k = pid, {i: int(chosen[pid == i].sum()) for i in range(len(SIZES))}
    core = _topk(flat, {g: math.floor(f * v + 0.5) for g, v in k.items()}, gid)
    mixed = np.where(core, 2.0, _hash(SEED ^ _PLACEMENT_SALT) * 2.0 ** -25 + 0.5)
    return list(torch.split(torch.from_numpy(_topk(mixed, k, gid)), SIZES))


@pytest.mark.timeout(120)
def test_defences_are_exact_at_any_world_size_and_match_the_reference():
    single = [_select(0, 1)]
    dist2 = run_distributed(_select, 2)
    for name in CASES:
        a, b = _gather(single, name), _gather(dist2, name)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
        if not name.startswith("noisy"):
            want = _reference(name)
            assert all(torch.equal(x, y) for x, y in zip(a, want)), name
    # per-tensor placement keeps each tensor's early-bird count, but not its elements
    plain = MaskSelector(_layout(0, 1), 0.6, "global", [], seed=SEED).from_scores(_scores())
    placed = _gather(single, "placement")
    for m, p in zip(plain.param_masks(), placed):
        assert int(m.sum()) == int(p.sum())
    up_plain, up_placed = plain.param_masks()[1], placed[1]
    assert not torch.equal(up_plain, up_placed)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("epsilon", [0.25, 1.0, 3.0])
def test_noisy_topk_bounds_an_attacker_who_knows_every_score(epsilon):
    """Planted |g| spanning 10 decades; the attacker ranks by the exact |g| (the best it can
    do from |g| alone). D4's bound: AUC ≤ e^ε/(1+e^ε); without noise the AUC is 1."""
    n = 30_000
    layout = PartitionLayout([ParamEntry("w", (n,), LocalSlice.for_rank(0, n, 0, 1), 0, 0, n)],
                             [n], 0, 1)
    g = torch.Generator().manual_seed(int(epsilon * 100))
    grad = torch.exp(torch.rand(n, generator=g) * 23 - 20)  # |g| in [e^-20, e^3]
    bound = math.exp(epsilon) / (1 + math.exp(epsilon))
    plain = MaskSelector(layout, 0.5, "global", [], seed=SEED).from_scores([grad])
    assert _auc(grad.numpy(), plain.param_masks()[0].numpy()) == 1.0
    for seed in (1, 2):
        sel = MaskSelector(layout, 0.5, "global", [], seed=seed, noise_epsilon=epsilon)
        mask = sel.from_scores([grad]).param_masks()[0]
        assert int(mask.sum()) == n // 2
        auc = _auc(grad.numpy(), mask.numpy())
        assert 0.5 < auc <= bound + 0.01, (auc, bound)  # 0.01: sampling error at n = 30k


@pytest.mark.timeout(30)
def test_noise_uses_its_own_stream():
    """The noise, the placement and the tie-break draw different streams of the one seed."""
    assert len({SEED, SEED ^ _NOISE_SALT, SEED ^ _PLACEMENT_SALT}) == 3
    layout = _layout(0, 1)
    with pytest.raises(ValueError, match="secret seed"):
        MaskSelector(layout, 0.6, "global", [], core_fraction=0.5).from_scores(_scores())
