"""Mask-recovery attacks: what an attacker can compute from a release, public text and our code.

An attack is a re-iterable source of per-element scores, one tensor at a time (each name once, in
any order); higher = more likely trained (in M). `evaluate.py` scores them against the
true mask (the owner's view) and turns any of them into a predicted mask an attacker could use.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import DataError
from ..errors import UserError
from ..stream_safetensors import CODE_DTYPES
from . import stats

Scores = Iterator[tuple[str, torch.Tensor]]

# Seeds people use: the attacker tries these (plus any given) when re-creating θ(0).
COMMON_SEEDS = (*range(0, 11), 17, 42, 123, 1234, 1337, 2023, 2024, 2025, 3407, 12345, 31337)


class AttackError(UserError, ValueError):
    """Input the attack suite cannot use; the message says what and how to fix it."""


@dataclass
class Attack:
    name: str
    needs: str            # what the attacker needs: "release", "public text", "shadow run"
    channel: str          # which channel it reads (the audit's wording)
    scores: Callable[[], Scores]
    info: dict = field(default_factory=dict)


class Target:
    """A release directory, read one tensor at a time."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise AttackError(f"no release at {self.path}: give the directory tools/release.py wrote")
        if not (self.path / "config.json").is_file():
            raise AttackError(f"{self.path} is not a release: no config.json")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise AttackError(f"{self.path} is not a release: no *.safetensors weights")
        self._where: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, entry)
        for f in files:
            header, problem = _header(f)
            if problem:
                raise AttackError(f"{f}: {problem}; re-download or re-release it")
            start = 8 + header.pop("__len__")
            self._where.update({n: (f, start, e) for n, e in header.items()})
        self.shapes = {n: tuple(e["shape"]) for n, (_, _, e) in self._where.items()}
        arch = (self.hf_config().architectures or [None])[0]  # none named: the family's causal LM
        if arch is not None and not arch.endswith(("ForCausalLM", "LMHeadModel")):
            raise AttackError(f"{self.path} is a {arch}: the attacks target pre-trained causal-LM "
                              "releases (the model PMP pre-trained)")
        self.names = sorted(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into its own memory. Not memory-mapped on purpose: every page of a
        mapping the suite touches would stay resident, and it reads the whole model many times."""
        path, start, entry = self._where[name]
        lo, hi = entry["data_offsets"]
        buf = bytearray(hi - lo)
        with open(path, "rb") as f:
            f.seek(start + lo)
            f.readinto(buf)
        dtype = CODE_DTYPES[entry["dtype"]]
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"]) if buf else \
            torch.empty(entry["shape"], dtype=dtype)

    def tensors(self) -> Scores:
        """(name, tensor) in sorted name order, one in memory at a time."""
        return ((name, self.get(name)) for name in self.names)

    def hf_config(self):
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    def init_replay(self, seed: int) -> Scores:
        """θ(0) as pmp_scale draws it from `seed` (fp32, on the CPU), one parameter at a time."""
        from transformers import AutoModelForCausalLM
        from ..models import seeded_init
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config())
        for name, value in seeded_init(model, seed):
            if name in self.shapes:
                yield name, value

    def load_model(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True,
                                                    dtype=torch.float32)


def _header(path: Path) -> tuple[dict, str | None]:
    """A safetensors file's tensor entries (+ "__len__", the header size), or why it cannot
    hold what its header promises (damaged, truncated, not safetensors)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        unknown = sorted({v["dtype"] for v in header.values()} - set(CODE_DTYPES))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return {}, f"not a readable safetensors file ({type(e).__name__}: {e})"
    if unknown:
        return {}, f"tensor dtypes {unknown} are not supported"
    size = path.stat().st_size
    if size != 8 + n + end:
        return {}, (f"the weights cannot be read: {size:,} bytes, its header promises "
                    f"{8 + n + end:,} (truncated?)")
    return {**header, "__len__": n}, None


def _per_tensor(target: Target, fn) -> Callable[[], Scores]:
    def scores() -> Scores:
        for name in target.names:  # the tensor is freed before its score is handed on
            yield name, fn(name, target.get(name))
    return scores


def data_free(target: Target) -> list[Attack]:
    """bits, constants, magnitudes (global / per tensor / row / column), init likelihood."""
    channels = {"bits": "bit patterns", "constant": "exact constant values",
                "magnitude": "global |w|", "magnitude_tensor": "|w| standardised per tensor",
                "magnitude_row": "|w| standardised per row", "magnitude_col":
                "|w| standardised per column"}
    spikes: dict[str, float | None] = {}  # per tensor, found on the first of the two passes

    def constant(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in spikes:
            spikes[name] = stats.spike_value(t)
        return stats.at_value_score(t, spikes[name])
    score = {name: (lambda _, t, f=fn: f(t)) for name, fn in stats.DATA_FREE.items()}
    score["constant"] = constant
    out = [Attack(name, "release", channels[name], _per_tensor(target, fn))
           for name, fn in score.items()]
    init = {name: (float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0)
            for name, v in target.init_replay(seed=0)}  # any seed: only the distribution is used
    out.append(Attack("init_likelihood", "release", "likelihood under the init distribution",
                      _per_tensor(target, lambda n, t: stats.init_likelihood(t, *init[n]))))
    return out


def seed_guess(target: Target, seeds=COMMON_SEEDS) -> Attack:
    """Re-create θ(0) from each candidate seed; the one matching most elements exactly wins,
    and the score is the distance from its θ(0) (0 = frozen, when the seed is right)."""
    best, best_hits, total = None, -1, sum(math.prod(s) for s in target.shapes.values())
    for seed in seeds:  # one parameter of the release and of the guess in memory at a time
        hits = 0
        for name, value in target.init_replay(int(seed)):
            t = target.get(name)
            hits += int((t.reshape(-1) == value.to(t.dtype).reshape(-1)).sum())
        if hits > best_hits:
            best, best_hits = int(seed), hits

    def scores() -> Scores:
        for name, value in target.init_replay(best):
            t = target.get(name).reshape(-1)
            score = (t.float() - value.to(t.dtype).reshape(-1).float()).abs_()
            del t, value  # not held while the consumer works on the score
            yield name, score
    return Attack("seed_guess", "release", "init-seed guessing", scores,
                  {"seeds_tried": len(seeds), "best_seed": best,
                   "exact_match_fraction": best_hits / total})


# --- public text ------------------------------------------------------------------------------------
def public_batches(source, target: Target, seq_len: int = 128, batch_size: int = 8,
                   n_batches: int = 64) -> list[torch.Tensor]:
    """Token batches from public text: a prepared MDS dir, or .txt/.jsonl[.gz] files (glob
    patterns) tokenized with the release's own tokenizer."""
    from ..data import iter_texts, load_tokenizer
    from ..data.prepare import read_prepared_tokens
    need = batch_size * n_batches
    path = Path(str(source))
    if (path / "meta.json").is_file():
        rows = read_prepared_tokens(path, "train", limit=need)
        rows = rows[:, :seq_len]
    else:
        try:
            tok = load_tokenizer(target.path)
            ids: list[int] = []
            for text in iter_texts([str(source)]):
                ids += tok.encode(text) + [tok.eos_id]
                if len(ids) >= need * seq_len:
                    break
        except (FileNotFoundError, DataError) as e:
            raise AttackError(f"public data {source}: {e}") from e
        if len(ids) < seq_len * batch_size:
            raise AttackError(f"public data {source}: {len(ids)} tokens, need at least "
                              f"{seq_len * batch_size}: give more text (files or an MDS dir)")
        n = len(ids) // seq_len
        rows = torch.tensor(ids[:n * seq_len]).reshape(n, seq_len)
    vocab = target.hf_config().vocab_size
    if int(rows.max()) >= vocab:
        raise AttackError(f"public data {source} has token ids ≥ the release's vocabulary "
                          f"({vocab}): it was tokenized with another tokenizer")
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def _dict_scores(values: dict[str, torch.Tensor]) -> Callable[[], Scores]:
    return lambda: ((n, values[n].reshape(-1)) for n in sorted(values))


def gradient_sums(target: Target, batches: list[torch.Tensor], at) -> Iterator[tuple[int, dict, dict, dict]]:
    """(K, Σ|g|, Σg², Σg) per element over the first K public batches, for each K in `at`
    (the running sums: divide before keeping them)."""
    model = target.load_model()
    params = {n: p for n, p in model.named_parameters() if n in target.shapes}
    g_abs = {n: torch.zeros_like(p) for n, p in params.items()}
    g_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    g_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    for k, ids in enumerate(batches[:max(at)], start=1):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in params.items():
            g_abs[n] += p.grad.abs()
            g_sq[n] += p.grad.square()
            g_sum[n] += p.grad
        if k in at:
            yield k, g_abs, g_sq, g_sum


def gradients(target: Target, batches: list[torch.Tensor], ks=(1, 4, 16, 64)) -> list[Attack]:
    """Mean |g| and mean g² (diagonal Fisher) over K public batches, for each K: the paper's
    "multiple gradient observations". Early-bird picked large-|g| elements, and the frozen
    complement is where the loss is sharp (the paper's own mechanism).

    Sign-aware, from K ≥ 2 batches: trained weights sit near a stationary point of loss +
    weight decay, where the mean gradient points along the weight (ḡ ≈ −λw, so −ḡ·w > 0);
    frozen random weights do not (`grad_sign`). And the gradient's signal-to-noise ratio
    |ḡ| / rms(g) (`grad_snr`) separates a consistent pull (frozen: off the stationary point)
    from noise around zero (trained), and sharpens with K where mean |g| blurs."""
    out = []
    weights = dict(target.tensors())
    for k, g_abs, g_sq, g_sum in gradient_sums(target, batches,
                                               [k for k in ks if k <= len(batches)]):
        out.append(Attack(f"grad_abs@K{k}", "public text", f"mean |g| over {k} batches",
                          _dict_scores({n: v / k for n, v in g_abs.items()}), {"K": k}))
        out.append(Attack(f"fisher@K{k}", "public text", f"mean g² over {k} batches",
                          _dict_scores({n: v / k for n, v in g_sq.items()}), {"K": k}))
        if k < 2:
            continue
        out.append(Attack(f"grad_sign@K{k}", "public text", f"−mean g·w over {k} batches",
                          _dict_scores({n: -(v / k) * weights[n].float()
                                        for n, v in g_sum.items()}), {"K": k}))
        out.append(Attack(f"grad_snr@K{k}", "public text",
                          f"−|mean g| / rms g over {k} batches",
                          _dict_scores({n: -(g_sum[n] / k).abs() / (g_sq[n] / k).sqrt()
                                        .clamp(min=1e-30) for n in g_sum}), {"K": k}))
    return out


def displacement(target: Target, batches: list[torch.Tensor], steps: int = 20,
                 lr: float = 1e-4) -> Attack:
    """|Δw| after a few AdamW steps on public data: where fine-tuning wants to move."""
    model = target.load_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in target.shapes}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for i in range(steps):
        ids = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters() if n in before}
    return Attack("displacement", "public text", f"|Δw| after {steps} AdamW steps",
                  _dict_scores(moved), {"steps": steps, "lr": lr})


def constant_init_names(target: Target) -> list[str]:
    """Tensors the public init sets to one constant (norm weights, biases). pmp_scale trains
    them always (`pmp.exclude_constant_init`, the default), which the attacker reads in our
    code: their mask bits are known without looking at the weights."""
    return sorted(n for n, v in target.init_replay(seed=0)
                  if v.numel() and bool((v == v.reshape(-1)[0]).all()))


def with_known_trained(attack: Attack, names: list[str]) -> Attack:
    """`attack` with every element of `names` scored above anything else (known trained)."""
    if not names:
        return attack
    known = set(names)
    top = torch.finfo(torch.float32).max

    def scores() -> Scores:
        for name, s in attack.scores():
            yield name, (torch.full((s.numel(),), top) if name in known else s)
    return Attack(attack.name, attack.needs, attack.channel, scores,
                  {**attack.info, "known_trained_tensors": len(known)})


def token_counts(batches: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.cat([b.reshape(-1) for b in batches]), minlength=vocab)


def structural(target: Target, counts: torch.Tensor) -> Attack:
    """Position alone: embedding / LM-head rows of frequent tokens get large early gradients, so
    early-bird keeps them; the release ships its tokenizer, so public text ranks the rows.
    Other tensors get a neutral score."""
    prior = torch.log1p(counts.float())

    def scores() -> Scores:
        for name, shape in sorted(target.shapes.items()):
            if len(shape) == 2 and shape[0] == counts.numel():
                yield name, prior[:, None].expand(shape).reshape(-1).clone()
            else:
                yield name, torch.full((math.prod(shape),), float(prior.median()))
    return Attack("structural", "public text", "token frequency → vocabulary rows", scores)
