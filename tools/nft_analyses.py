"""The paper's analyses of non-fine-tunability; each writes <out>/<name>.png and <name>.json.

    # fine-tuning vs mask ratio: one PMP release (+ private mask) per ratio
    python tools/nft_analyses.py ratio-sweep --input 0.5 rel/r05 rel/r05_mask \
        --input 0.7 rel/r07 rel/r07_mask --dense rel/dense --pretrain-data data/demo/mds \
        --out runs/analyses/ratio
    # early-bird vs random mask at the same ratio
    python tools/nft_analyses.py mask-source --input earlybird rel/eb eb_mask \
        --input random rel/rnd rnd_mask --out runs/analyses/source
    # 1-D loss landscape along an authorized (masked) vs unauthorized (full-space) direction
    python tools/nft_analyses.py landscape --release rel/pmp --mask pmp_mask --out runs/analyses
    # |gradient| histograms of masked vs unmasked elements and their overlap coefficient
    python tools/nft_analyses.py grad-hist --release rel/pmp --mask pmp_mask --out runs/analyses

The task and fine-tuning settings come from --finetune (default configs/finetune/review_lm.yaml,
overridable with --set). ratio-sweep / mask-source run a grid (--lrs x --steps x --seeds, both
modes) with cached cells, like tools/nft_report.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pmp_scale.cli import add_verbose_flag, fail_cleanly, quiet_third_party, tool_parser  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune", default=str(REPO / "configs/finetune/review_lm.yaml"),
                   help="fine-tuning config: the task and the training settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the fine-tuning config")
    p.add_argument("--out", required=True, help="output directory")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense", help="a dense release to draw as the reference")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    p.add_argument("--steps", type=int, nargs="+", default=[30])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--min-seeds", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")


def _single_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", required=True)
    p.add_argument("--mask", required=True, help="the release's private mask artifact")
    p.add_argument("--grad-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    add_verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ratio-sweep", help="fine-tuning vs mask ratio")
    p.add_argument("--input", nargs=3, action="append", required=True,
                   metavar=("RATIO", "RELEASE", "MASK"))
    p.add_argument("--pretrain-data", required=True,
                   help="prepared pre-training data (MDS dir): base quality = its val loss")
    p.add_argument("--pretrain-eval-samples", type=int, default=64)
    _common(p)
    _grid_args(p)
    p = sub.add_parser("mask-source", help="early-bird vs random mask")
    p.add_argument("--input", nargs=3, action="append", required=True,
                   metavar=("LABEL", "RELEASE", "MASK"))
    _common(p)
    _grid_args(p)
    p = sub.add_parser("landscape", help="1-D loss landscape, masked vs full-space direction")
    _common(p)
    _single_args(p)
    p.add_argument("--radius", type=float, default=1.0,
                   help="max |α| along the gradient directions (L2 units)")
    p.add_argument("--random-radius", type=float, default=0.5,
                   help="max |α| along random directions, as a fraction of ‖θ_release‖")
    p.add_argument("--points", type=int, default=17)
    p.add_argument("--eval-batches", type=int, default=2)
    p = sub.add_parser("grad-hist", help="|gradient| of masked vs unmasked elements")
    _common(p)
    _single_args(p)
    p.add_argument("--bins", type=int, default=100)
    return parser.parse_args(argv)


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the one in-process rank (DeepSpeed reads LOCAL_RANK from the environment only)
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_third_party(args.verbose)
    from pmp_scale.config import ConfigError
    from pmp_scale.nft import analyses
    from pmp_scale.finetune.config import load_finetune_config
    ft = load_finetune_config(args.finetune, args.overrides)
    if args.command in ("ratio-sweep", "mask-source"):
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        common = dict(out=args.out, finetune=args.finetune, lrs=args.lrs, steps=args.steps,
                      seeds=args.seeds, dense_release=args.dense, overrides=args.overrides,
                      progress=not args.quiet, min_seeds=args.min_seeds)
        if args.command == "ratio-sweep":
            try:
                inputs = [(float(r), rel, mask) for r, rel, mask in args.input]
            except ValueError:
                raise ConfigError("ratio-sweep --input: RATIO must be a number") from None
            numbers = analyses.ratio_sweep(
                inputs, pretrain_data=args.pretrain_data,
                pretrain_eval_samples=args.pretrain_eval_samples, **common)
        else:
            numbers = analyses.mask_source([tuple(i) for i in args.input], **common)
    elif args.command == "landscape":
        numbers = analyses.landscape(args.release, args.mask, ft, args.out, radius=args.radius,
                                     random_radius=args.random_radius, points=args.points, grad_batches=args.grad_batches,
                                     eval_batches=args.eval_batches, batch_size=args.batch_size,
                                     seed=args.seed)
    else:
        numbers = analyses.grad_hist(args.release, args.mask, ft, args.out,
                                     grad_batches=args.grad_batches, batch_size=args.batch_size,
                                     seed=args.seed, bins=args.bins)
    shown = {k: v for k, v in numbers.items()
             if k not in ("histogram", "curves", "alphas", "random_alphas")}
    print(json.dumps(shown, indent=1, default=float))
    print(f"wrote {Path(args.out) / numbers['plot']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
