"""Cut a private mask artifact into per-rank ZeRO-3 slices for any world size.

    python tools/reshard_mask.py runs/demo_pmp/private/mask --world-size 8 --out mask_w8

Writes rank{r}.safetensors (per parameter: the rank's slice, packed from its own bit 0) and
layout.json (shapes, per-rank start and length), atomically; refuses a non-empty --out unless
--overwrite.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import fail_cleanly, tool_parser  # noqa: E402
from pmp_scale.release.export import write_resharded_mask  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("private_dir", type=Path)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out dir")
    args = parser.parse_args(argv)
    files = write_resharded_mask(args.private_dir, args.world_size, args.out,
                                 overwrite=args.overwrite)
    print(f"{len(files)} rank slice files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
