"""A whole PMP study in one command: data, dense + PMP pre-training runs, releases, the
non-fine-tunability grid per task, mask-secrecy attacks and the claims table.

    python tools/study.py --config configs/study/demo.yaml             # run (or resume) it
    python tools/study.py --config configs/study/demo.yaml --dry-run   # the plan and its time

Writes <out_dir>/study.md, study.json and plots. Killed at any point, the same command
resumes: finished runs, releases, grid cells and attacks are reused, never redone.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import add_verbose_flag, fail_cleanly, quiet_third_party, tool_parser  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__, progress=True)
    add_verbose_flag(parser)
    parser.add_argument("--config", required=True, help="study YAML (see configs/study/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimated time")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # the one in-process rank (DeepSpeed reads LOCAL_RANK from the environment only)
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_third_party(args.verbose)
    from pmp_scale.study import prepare, run_study
    from pmp_scale.study.plan import describe, estimate
    cfg, base_dir, plan = prepare(args.config, args.overrides)
    if not _has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(describe(cfg, plan, estimate(cfg, plan)))
    if args.dry_run:
        return 0
    doc = run_study(cfg, base_dir, plan, progress=not args.quiet)
    from pmp_scale.study.write import claims_table
    print("\n" + claims_table(doc))
    print(f"\nwrote {plan.out / 'study.md'}, {plan.out / 'study.json'} "
          f"({doc['wall_s'] / 60:.1f} min; {len(doc['work']['reused'])} steps reused)")
    return 0


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pmp_scale.study").setLevel(logging.INFO)
    sys.exit(main())
