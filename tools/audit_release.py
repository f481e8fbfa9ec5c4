"""Audit a release before publishing it: does it load, and does it give nothing private away?

    python tools/audit_release.py release/demo_pmp [--private runs/demo_pmp/private/mask]

Lists every file and safetensors metadata entry, loads the model offline and generates a few
tokens, and fails (exit 1, one line per problem) on pickle files, unknown files, optimizer/mask/
seed/RNG names, PMP config keys, mask-like tensors or metadata other than {"format": "pt"}.
With --private: the release sha256 must match mask.json's, and where init.safetensors exists the
complement (mask bit 0) of every tensor must equal θ(0) in the release dtype. Constant-init
leakage (norm weights still exactly 1, biases exactly 0) is reported, not failed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import fail_cleanly, tool_parser  # noqa: E402
from pmp_scale.secrecy import audit_release  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("release_dir", type=Path)
    parser.add_argument("--private", type=Path, metavar="PRIVATE_DIR",
                        help="the private mask artifact this release was made with")
    args = parser.parse_args(argv)
    audit = audit_release(args.release_dir, args.private)
    print("\n".join(audit.report))
    for problem in audit.problems:
        print(f"FAIL {problem}")
    print(f"audit {'FAILED' if audit.problems else 'passed'}: {args.release_dir}")
    return 1 if audit.problems else 0


if __name__ == "__main__":
    sys.exit(main())
