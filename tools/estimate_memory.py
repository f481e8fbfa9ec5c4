"""Per-rank memory of a preset under ZeRO-3, from DeepSpeed's estimator plus PMP's own state.

    python tools/estimate_memory.py llama-7b --gpus-per-node 8 --nodes 4 [--offload optimizer]

PMP adds per rank: the packed mask (1 bit per local element) and the θ(0) copy of the local
fp32 partition kept on the host for rewind and the complement-drift check; the step hook's
transient is one fp32 sub-group snapshot (deepspeed.zero_optimization.sub_group_size).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import tool_parser  # noqa: E402


def largest_layer(cfg) -> int:
    """Largest single parameter tensor (what ZeRO-3 gathers at once, at worst)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return max(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from pmp_scale.models import PRESETS, build_hf_config, count_params

    parser = tool_parser(__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--offload", choices=["none", "optimizer", "all"], default="none")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="for presets that take the vocabulary from the tokenizer")
    parser.add_argument("--sub-group-size", type=float, default=1e8)
    args = parser.parse_args(argv)

    cfg = build_hf_config(args.preset, tokenizer_vocab_size=None
                          if PRESETS[args.preset]["vocab_size"] else args.vocab_size)
    total, largest = count_params(cfg), largest_layer(cfg)
    world = args.gpus_per_node * args.nodes
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, args.gpus_per_node, args.nodes,
        cpu_offload=args.offload != "none", cpu_offload_params=args.offload == "all")
    local = total / world
    gib = 2**30
    rows = [
        ("parameters", f"{total / 1e9:.3f} B (largest tensor {largest / 1e6:.1f} M)"),
        ("ranks", f"{world} = {args.nodes} node(s) x {args.gpus_per_node}"),
        ("ZeRO-3 model states / GPU", f"{gpu / gib:8.2f} GiB  (DeepSpeed estimator)"),
        ("ZeRO-3 host memory / node", f"{cpu / gib:8.2f} GiB  (DeepSpeed estimator)"),
        ("PMP mask / rank (packed)", f"{local / 8 / 2**20:8.2f} MiB  (1 bit per local element)"),
        ("PMP θ(0) copy / rank (host)", f"{local * 4 / gib:8.2f} GiB"),
        ("PMP step snapshot (transient)",
         f"{min(local, args.sub_group_size) * 4 / gib:8.2f} GiB  (one fp32 sub-group)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{args.preset}, ZeRO-3, offload={args.offload}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
