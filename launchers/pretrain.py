"""Pre-train a causal LM with DeepSpeed ZeRO-3.

    deepspeed [--num_gpus N | --hostfile H] launchers/pretrain.py --config configs/run.yaml \
        [--set optim.lr=3e-4 ...] [--resume auto|TAG]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmp_scale.cli import fail_cleanly, launcher_parser, quiet_third_party  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = launcher_parser(__doc__, "YAML run config")
    parser.add_argument("--resume", default=None,
                        help="'auto' = newest checkpoint in run_dir if any, or a tag name")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv=None, faults=None) -> int:
    """`faults`: the crash tests' injection points (pmp_scale.faults), none by default."""
    args = parse_args(argv)
    quiet_third_party(args.verbose)
    from pmp_scale.config import load_config
    cfg = load_config(args.config, args.overrides)  # fails before any process-group work
    from pmp_scale.engine import Trainer
    trainer = Trainer(cfg, faults=faults)
    trainer.resume(args.resume)
    trainer.train()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
