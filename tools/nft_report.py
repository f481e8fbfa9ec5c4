"""Non-fine-tunability report: fine-tune a PMP release and a dense baseline over a grid
(modes x learning rates x durations x seeds) and write report.md, results.json and plots.

    python tools/nft_report.py --config configs/finetune/demo_report.yaml
    python tools/nft_report.py --config my_grid.yaml --set lrs=[1e-4,3e-4] --set out_dir=runs/r2

Runs in one process on a single-process (W=1) DeepSpeed ZeRO-3 engine; finished cells are
cached in <out_dir>/cells/ and reused by a rerun with the same settings (--fresh ignores them).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import add_verbose_flag, fail_cleanly, quiet_third_party, tool_parser  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = tool_parser(__doc__, progress=True)
    add_verbose_flag(parser)
    parser.add_argument("--config", required=True,
                        help="report YAML (see configs/finetune/demo_report.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="rerun every cell, ignoring the cache")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the one in-process rank (DeepSpeed reads LOCAL_RANK from the environment only)
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_third_party(args.verbose)
    from pmp_scale.nft.report import load_report_config, run_report
    cfg, base_dir = load_report_config(args.config, args.overrides)
    doc = run_report(cfg, base_dir, fresh=args.fresh, progress=not args.quiet)
    out = Path(cfg.out_dir)
    print((out / "report.md").read_text().split("## Full grid")[0].rstrip())
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'} and "
          f"{', '.join(str(out / p) for p in doc['plots'].values())}")
    if doc["failed"]:
        first = doc["failed"][0]
        print(f"error: {len(doc['failed'])} cell(s) failed and are left out of the report "
              f"(first: {first['cell']}: {first['error']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
