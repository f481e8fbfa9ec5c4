"""Publish a ZeRO-3 checkpoint (any world size) as a standard, mask-free Hugging Face model.

    python tools/release.py runs/demo_pmp release/demo_pmp --dtype bf16 \\
        --private runs/demo_pmp/private/mask

CKPT_DIR: a run dir, its checkpoints/ dir or one tag dir (default: the `latest` tag), which must
be complete and match its recorded checksums. Only dense
weights, config, generation config and tokenizer are written; then run tools/audit_release.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import add_checkpoint_arguments, fail_cleanly, tool_parser  # noqa: E402
from pmp_scale.release import DTYPES, release_checkpoint, resolve_checkpoint  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--max-shard-size", default="2GB", help="per safetensors file (HF naming)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--private", type=Path, metavar="PRIVATE_MASK_DIR",
                        help="record the release sha256 and dtype in this mask artifact's mask.json")
    parser.add_argument("--unverified", action="store_true",
                        help="skip the completion-marker and checksum check (a ZeRO-3 checkpoint "
                             "not written by pmp_scale)")
    parser.add_argument("--allow-leaks", action="store_true",
                        help="release even if the weights show an exact mask channel (research "
                             "on leaky releases; never for publishing)")
    args = parser.parse_args(argv)
    tag_dir = resolve_checkpoint(args.ckpt_dir, args.tag, verify=not args.unverified)
    sha = release_checkpoint(tag_dir, args.out_dir, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             private_dir=args.private, allow_leaks=args.allow_leaks)
    print(f"released {tag_dir} -> {args.out_dir} ({args.dtype}, sha256 {sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
