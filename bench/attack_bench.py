"""Peak RSS and wall time of the data-free mask-recovery attacks on a gpt2-1.5b-shaped release.

    python bench/attack_bench.py [--preset gpt2-1.5b] [--seeds 0,1234]

The release (random fp32 weights, HF layout) and a random ρ = 0.7 private mask are written
directly, one tensor at a time. tools/attack_mask.py then runs every data-free attack (bits,
constant, magnitudes, init likelihood, seed guessing over --seeds) scored against the mask, as
a subprocess; its peak RSS is its ru_maxrss. Target: peak RSS <= 0.5x the fp32 model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from release_bench import _WRAPPER  # noqa: E402  (ru_maxrss of the child alone)

DATA_FREE = "bits,constant,magnitude,magnitude_tensor,magnitude_row,magnitude_col,init_likelihood,seed_guess"


def write_release(out: Path, preset: str) -> int:
    """config.json + sharded safetensors of random weights, and a random mask; returns numel."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM
    from pmp_scale.mask import pack_bits, write_artifact
    from pmp_scale.models import build_hf_config
    from pmp_scale.release import INDEX_FILE
    from pmp_scale.stream_safetensors import write_planned
    cfg = build_hf_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    rel = out / "release"
    rel.mkdir(parents=True)
    cfg.save_pretrained(rel)
    split = split_torch_state_dict_into_shards(
        {n: torch.empty(s, device="meta") for n, s in shapes.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size="1GB")
    plan = {rel / f: [(n, torch.float32, shapes[n]) for n in sorted(ns)]
            for f, ns in split.filename_to_tensors.items()}
    order = [n for items in plan.values() for n, _, _ in items]
    write_planned(plan, ((n, torch.randn(shapes[n]).mul_(0.02)) for n in order))
    (rel / INDEX_FILE).write_text(json.dumps({"metadata": split.metadata,
                                              "weight_map": split.tensor_to_filename}))
    g = torch.Generator().manual_seed(0)
    write_artifact(out / "mask", ((n, pack_bits(torch.rand(math.prod(s), generator=g) < 0.7), s)
                                  for n, s in shapes.items()), {"mask_ratio": 0.7})
    return sum(math.prod(s) for s in shapes.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-1.5b")
    parser.add_argument("--seeds", default="0,1234", help="seeds the seed-guessing attack tries")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="attack_bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        numel = write_release(tmp, args.preset)
        print(f"wrote a {args.preset} release ({numel / 1e9:.2f}B params) and its mask in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable,
                               str(REPO / "tools" / "attack_mask.py"), str(tmp / "release"),
                               "--out", str(tmp / "report"), "--private", str(tmp / "mask"),
                               "--attacks", DATA_FREE, "--seeds", args.seeds],
                              capture_output=True, text=True, env=env)
        wall, maxrss_kib, code = proc.stdout.split()[-3:]
        if int(code):
            raise SystemExit(f"attack suite failed:\n{proc.stderr[-3000:]}")
        doc = json.loads((tmp / "report" / "attack.json").read_text())
    size, rss = numel * 4, int(maxrss_kib) * 1024
    print(f"\n{'attack':<18}{'wall s':>8}{'AUC':>8}")
    for name, r in doc["attacks"].items():
        print(f"{name:<18}{r['time_s']:>8.1f}{r['auc']:>8.3f}")
    print(f"\n{'release':<14}{'fp32 size':>12}{'wall s':>9}{'peak RSS':>12}{'RSS/fp32':>10}")
    print(f"{args.preset:<14}{size / 2**30:>9.2f} GiB{float(wall):>9.1f}{rss / 2**30:>8.2f} GiB"
          f"{rss / size:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
