"""Throughput of the real engine on one GPU: dense vs PMP (ρ 0.7, frozen complement) steps.

    deepspeed --num_gpus 1 bench/gpu_bench.py [--preset llama-1.1b --precision bf16
        --micro-batch 4 --seq-len 2048 --blocks 3 --steps 5] [--out result.json]

ZeRO-3 with SDPA attention and activation checkpointing (HF's non-reentrant checkpointing).
Dense and PMP blocks alternate on one engine (as bench/pmp_step_bench.py), so noise hits both
alike. Reports tokens/s, MFU (against the device's dense bf16 peak), peak device memory and
the PMP/dense step-time ratio. Without --data it prepares its own from the embedded corpus: a
4k SentencePiece vocabulary and MDS shards of --seq-len tokens, under --work.
tools/gpu_check.sh runs it on the GPU machine, and at tiny size on a CPU rank (--preset
llama-tiny) in the simulated-device test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def prepare(work: Path, seq_len: int, vocab_size: int, min_val_samples: int) -> tuple[str, str]:
    """A SentencePiece model and MDS shards from two embedded books (rank 0 writes).

    The validation split must hold at least one micro-batch per rank (the trainer reads one
    held-out batch): at 2048 tokens the books' 2 % gave 2 samples, fewer than a micro-batch
    of 4. 10 % of two books is ~12 samples of 2048 tokens; fewer is refused here, by name."""
    from pmp_scale.data import DataError, prepare_dataset, read_meta, train_sentencepiece
    books = [str(REPO / "data" / "corpus" / b) for b in ("persuasion.txt.gz",
                                                         "northangerabbey.txt.gz")]
    tok, data = work / f"spm{vocab_size}", work / f"mds{seq_len}_v{vocab_size}"
    if not (data / "meta.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        model = train_sentencepiece(books, str(tok), vocab_size=vocab_size)
        prepare_dataset(books, model, data, seq_len=seq_len, val_fraction=0.1, progress=False)
    n_val = read_meta(data)["num_val_samples"]
    if n_val < min_val_samples:
        raise DataError(f"the bench's validation split has {n_val} samples of {seq_len} tokens, "
                        f"fewer than one micro-batch per rank ({min_val_samples}): lower "
                        f"--seq-len or --micro-batch")
    return str(data), str(tok) + ".model"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1.1b")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--attn", default="sdpa", help="attention implementation (HF)")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--data", help="prepared MDS directory (default: prepared under --work)")
    p.add_argument("--tokenizer")
    p.add_argument("--vocab-size", type=int, default=4000,
                   help="of the SentencePiece model trained when there is no --data")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "pmp_gpu_bench"))
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args(argv)

    from pmp_scale.config import parse_config
    from pmp_scale.engine import Trainer
    from pmp_scale.zero3 import init_distributed
    sys.path.insert(0, str(REPO / "bench"))
    from pmp_step_bench import dense_vs_masked, timed_steps
    from pmp_scale.telemetry import peak_tflops

    init_distributed()
    seconds = {}  # where the bench's own time goes (the estimate of tools/gpu_check.sh)
    t0 = time.perf_counter()
    data, tok = args.data, args.tokenizer
    if data is None:
        if dist.get_rank() == 0:
            data, tok = prepare(Path(args.work), args.seq_len, args.vocab_size,
                                args.micro_batch * dist.get_world_size())
        shared = [data, tok]
        dist.broadcast_object_list(shared, src=0)
        data, tok = shared
    world = dist.get_world_size()
    if dist.get_rank() == 0:  # the run's checkpoint dir under --work, not loose in TMPDIR
        Path(args.work).mkdir(parents=True, exist_ok=True)
    run_dir = [tempfile.mkdtemp(prefix="run_", dir=args.work) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run_dir, src=0)  # one run_dir for all ranks (it is checked)
    cfg = parse_config({
        "run_dir": run_dir[0], "seed": 1,
        "model": {"preset": args.preset, "overrides": {"attn_implementation": args.attn}},
        "data": {"path": data, "tokenizer": tok},
        "train": {"micro_batch_size": args.micro_batch,
                  "global_batch_size": args.micro_batch * world, "max_steps": 10**6,
                  "precision": args.precision, "eval_batches": 1},
        "optim": {"lr": 1e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "logging": {"tensorboard": False},
        "pmp": {"enabled": True, "mask_source": "random", "mask_ratio": 0.7,
                "drift_every": 10**9},
    })
    seconds["prepare_data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    t = Trainer(cfg)
    if not args.no_activation_checkpointing:
        t.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    pmp, batches = t.pmp, t._batches()
    seconds["build_engine_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed_steps(t, batches, 2)  # warm-up: allocations, optimizer state, kernels
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    dense, masked = dense_vs_masked(t, batches, args.blocks, args.steps)
    seconds["steps_s"] = time.perf_counter() - t0

    d, m = statistics.median(dense), statistics.median(masked)
    tokens = cfg.train.global_batch_size * t.seq_len
    peak = peak_tflops(None)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world, "preset": args.preset, "params": t.n_params,
        "precision": t.precision, "attn": t.model.config._attn_implementation,
        "activation_checkpointing": not args.no_activation_checkpointing,
        "seq_len": t.seq_len, "global_batch": cfg.train.global_batch_size,
        "dense_step_s": d, "pmp_step_s": m, "pmp_dense_ratio": m / d,
        "dense_tokens_per_s": tokens / d, "pmp_tokens_per_s": tokens / m,
        "dense_mfu": (tokens / d * t.flops_per_token / world / (peak * 1e12)) if peak else None,
        "pmp_mfu": (tokens / m * t.flops_per_token / world / (peak * 1e12)) if peak else None,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                         else None),
        "mask_bits_per_param": 8 * pmp.mask_state_bytes() / sum(pmp.layout.sub_group_sizes),
        "steps_timed": 2 * args.blocks * args.steps, **seconds}
    if dist.get_rank() == 0:
        print(f"\n{args.preset} ({t.n_params / 1e9:.3f}B params) on {result['device']} x{world}, "
              f"{t.precision}, {result['attn']}, activation checkpointing "
              f"{'on' if result['activation_checkpointing'] else 'off'}, "
              f"{tokens:,} tokens/step")
        for key in ("dense_tokens_per_s", "pmp_tokens_per_s", "pmp_dense_ratio", "dense_mfu",
                    "pmp_mfu", "peak_mem_gib", "mask_bits_per_param"):
            value = result[key]
            print(f"  {key:<22} {'n/a' if value is None else f'{value:,.4f}'}")
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from pmp_scale.cli import fail_cleanly
    outcome = fail_cleanly(main)()  # bad input: one line, exit status 2
    sys.exit(outcome if isinstance(outcome, int) else 0)
