"""The mechanism on one release: the top Hessian eigenvalue (power iteration on Hessian-vector
products) and the gradient RMS per element of the pre-training validation loss, restricted to
the private mask, to its complement and to all weights (pmp_scale/study/curvature.py).

    python tools/curvature.py --release runs/release/demo_pmp --mask runs/demo_pmp/private/mask \\
        --data data/demo/mds [--samples 8] [--iters 30]

A dense release takes a PMP run's mask as the reference index sets. Prints JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import fail_cleanly, tool_parser  # noqa: E402


@fail_cleanly
def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--release", required=True, help="released HF model directory")
    parser.add_argument("--mask", required=True, help="private mask artifact directory")
    parser.add_argument("--data", required=True, help="prepared pre-training data (MDS dir)")
    parser.add_argument("--samples", type=int, default=8, help="validation sequences")
    parser.add_argument("--iters", type=int, default=30, help="power-iteration steps at most")
    args = parser.parse_args(argv)
    from pmp_scale.data.prepare import read_prepared_tokens
    from pmp_scale.study.curvature import release_curvature
    tokens = read_prepared_tokens(args.data, "val", args.samples)
    print(json.dumps(release_curvature(args.release, args.mask, tokens, args.iters), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
