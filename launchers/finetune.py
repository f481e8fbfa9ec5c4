"""Fine-tune a released model: unauthorized (all weights), unauthorized-lora, or authorized
(inside the private mask), on DeepSpeed ZeRO-3.

    python launchers/finetune.py --config configs/finetune/review_lm.yaml \
        --set release=runs/release/demo_pmp --set mode=authorized \
        --set mask=runs/demo_pmp/private/mask --set out_dir=runs/ft/pmp_auth
    deepspeed --num_gpus N launchers/finetune.py --config ...   # W ranks, same engine

Without a launcher it runs as a single-process (W=1) ZeRO-3 engine. Writes
<out_dir>/result.json (curves, validation/test metrics, backbone change counts) and
metrics.jsonl (per-step scalars, as pre-training writes them); with
--set export.dir=DIR (causal-LM tasks) also the fine-tuned model as a standard HF directory,
through the same release path as pre-training (tools/release.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmp_scale.cli import fail_cleanly, launcher_parser, quiet_third_party  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    return launcher_parser(__doc__, "YAML fine-tuning config").parse_args(argv)


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    # without a launcher: one in-process rank (DeepSpeed reads it from the environment only)
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_third_party(args.verbose)
    from pmp_scale.finetune.config import load_finetune_config
    cfg = load_finetune_config(args.config, args.overrides)  # before any process-group work
    from pmp_scale.finetune.train import finetune
    result = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":
        summary = {"mode": result["mode"], "steps": result["steps_done"],
                   "validation": result["final"]["validation"], "test": result["final"]["test"],
                   "params": result["params"],
                   **{k: result[k] for k in ("backbone", "export") if k in result}}
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
