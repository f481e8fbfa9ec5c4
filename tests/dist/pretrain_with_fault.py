"""launchers/pretrain.py with one crash-test fault handed to its trainer.

    deepspeed ... tests/dist/pretrain_with_fault.py --fault rank1:step:10:STOP --config ...

The package never builds a fault plan itself; a test entry like this one does, from its own
command line, and passes it in (pmp_scale/faults.py lists the points).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launchers import pretrain  # noqa: E402
from pmp_scale.faults import FaultPlan  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fault", required=True)
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(pretrain.main(rest, faults=FaultPlan(args.fault, int(os.environ["RANK"]))))
