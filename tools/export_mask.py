"""Rebuild the private mask artifact from a PMP checkpoint's per-rank mask slices.

    python tools/export_mask.py runs/demo_pmp runs/demo_pmp/private/mask_step1000 --tag step00001000

Works at any world size; one parameter's mask is unpacked at a time. --init also writes θ(0)
(init.safetensors) from the ranks' private snapshots, for the audit's complement check.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import add_checkpoint_arguments, fail_cleanly, tool_parser  # noqa: E402
from pmp_scale.release.export import export_mask  # noqa: E402
from pmp_scale.release import resolve_checkpoint  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("private_dir", type=Path)
    parser.add_argument("--init", action="store_true", help="also write θ(0) as init.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty PRIVATE_DIR")
    args = parser.parse_args(argv)
    tag_dir = resolve_checkpoint(args.ckpt_dir, args.tag)
    out = export_mask(tag_dir, args.private_dir, overwrite=args.overwrite, with_init=args.init)
    print(f"mask of {tag_dir} -> {out} (private: never publish it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
