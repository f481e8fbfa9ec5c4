"""Peak RSS and wall time of tools/release.py on a gpt2-1.5b-shaped ZeRO-3 checkpoint of 2 ranks.

    python bench/release_bench.py [--preset gpt2-1.5b] [--world-size 2] [--small CKPT_DIR]

A real 2-rank engine for this model needs ~9 GB per rank, so the checkpoint is written directly
in the format DeepSpeed 0.19 saves and `deepspeed.utils.zero_to_fp32` reads, one rank at a time,
with random weights; like a PMP run's, each rank's client state holds its θ(0) partition (as big
as the fp32 master). Adam moments are left out: the reader drops them unread. The release runs
as a subprocess; its peak RSS is its ru_maxrss. Target: peak RSS <= 0.5x fp32.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_checkpoint(root: Path, preset: str, world: int, sub_group_size: int = 100_000_000) -> int:
    """A ZeRO-3 checkpoint tag `root/checkpoints/step00000001` (+ hf/); returns the parameter count."""
    import deepspeed
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from transformers import AutoModelForCausalLM, GenerationConfig
    from pmp_scale.models import build_hf_config

    cfg = build_hf_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters())  # tied weights once, as ZeRO-3 partitions them
    owner = {id(p): n for n, p in params.items()}
    shared = {n: owner[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
              if owner[id(p)] != n}
    groups, size = [OrderedDict()], 0  # sub-groups of at most sub_group_size local elements
    for name, p in params.items():
        if size and size + -(-p.numel() // world) > sub_group_size:
            groups.append(OrderedDict())
            size = 0
        groups[-1][name] = p.shape
        size += -(-p.numel() // world)
    tag = root / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    for rank in range(world):
        flats = [torch.randn(sum(-(-s.numel() // world) for s in g.values())).mul_(0.02)
                 for g in groups]
        torch.save({"module": {n: torch.empty(0) for n in params}, "buffer_names": [],
                    "param_shapes": groups, "frozen_param_shapes": OrderedDict(),
                    "frozen_param_fragments": OrderedDict(), "shared_params": shared,
                    "ds_version": deepspeed.__version__, "dp_world_size": world,
                    "pmp_components": {"pmp": {"theta0": flats}}},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {
                        "zero_stage": ZeroStageEnum.weights, "partition_count": world,
                        "fp32_flat_groups": flats,
                        "optimizer_state_dict": {"state": {}, "param_groups": []}},
                    "ds_version": deepspeed.__version__},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del flats
    (root / "checkpoints" / "latest").write_text(tag.name)
    cfg.save_pretrained(tag / "hf")
    GenerationConfig.from_model_config(cfg).save_pretrained(tag / "hf")
    return sum(p.numel() for p in params.values())


# ru_maxrss of a child forked from this (large) process would include the parent's pages it
# shared before exec, so a small wrapper process starts the release and reports its peak.
_WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def measure(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `python tools/release.py ARGS`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable,
                           str(REPO / "tools" / "release.py"), *args],
                          capture_output=True, text=True, env=env)
    wall, maxrss_kib, code = proc.stdout.split()[-3:]
    if int(code):
        raise SystemExit(f"release failed:\n{proc.stderr[-3000:]}")
    return float(wall), int(maxrss_kib) * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-1.5b")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--small", type=Path, help="also release this (real) checkpoint")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: temp)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="release_bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        numel = write_checkpoint(tmp / "run", args.preset, args.world_size)
        print(f"wrote a {args.world_size}-rank {args.preset} checkpoint ({numel / 1e9:.2f}B params) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        cases = [(f"{args.preset} W={args.world_size}", tmp / "run", numel)]
        if args.small:
            from pmp_scale.release import lazy_state_dict, resolve_checkpoint
            small = sum(t.shape.numel() for t in lazy_state_dict(resolve_checkpoint(args.small)).values())
            cases.append((f"{args.small.name} (real)", args.small, small))
        for label, ckpt, n in cases:
            for dtype in ("fp32", "bf16"):
                out = tmp / f"out-{len(rows)}"
                wall, rss = measure([str(ckpt), str(out), "--dtype", dtype, "--max-shard-size", "1GB",
                                     "--unverified"])  # built directly: no completion marker
                shards = len(list(out.glob("*.safetensors")))
                rows.append((label, dtype, n * 4, wall, rss, shards))
                print(f"  {label} {dtype}: {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    print(f"\n{'checkpoint':<26}{'dtype':>6}{'fp32 size':>12}{'shards':>8}{'wall s':>9}"
          f"{'peak RSS':>12}{'RSS/fp32':>10}")
    for label, dtype, size, wall, rss, shards in rows:
        print(f"{label:<26}{dtype:>6}{size / 2**30:>9.2f} GiB{shards:>8}{wall:>9.1f}"
              f"{rss / 2**30:>8.2f} GiB{rss / size:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
