"""Compare a dense and a PMP pre-training run: validation loss, discovery, mask density.

    python tools/compare_runs.py runs/demo runs/demo_pmp
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import tool_parser  # noqa: E402
from pmp_scale.telemetry import read_metrics  # noqa: E402


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["val/loss"]) for m in read_metrics(run_dir) if "val/loss" in m]


def summarize(run_dir: Path) -> dict:
    vals = val_losses(run_dir)
    if not vals:
        raise SystemExit(f"error: no validation losses in {run_dir}/metrics.jsonl")
    first, last = vals[0], vals[-1]
    return {"run": str(run_dir), "val_step0": first[1], "val_final": last[1],
            "final_step": last[0], "drop": first[1] - last[1]}


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("dense", type=Path)
    parser.add_argument("pmp", type=Path)
    parser.add_argument("--min-drop", type=float, default=1.0,
                        help="fail unless each run's val loss fell by this many nats")
    args = parser.parse_args(argv)
    rows = [summarize(args.dense), summarize(args.pmp)]
    print(f"\n{'run':<24}{'val loss step 0':>16}{'final':>10}{'drop':>8}{'steps':>8}")
    for r in rows:
        print(f"{r['run']:<24}{r['val_step0']:>16.4f}{r['val_final']:>10.4f}"
              f"{r['drop']:>8.3f}{r['final_step']:>8}")
    gap = rows[1]["val_final"] / rows[0]["val_final"] - 1
    print(f"\nPMP final val loss vs dense: {gap:+.2%}")
    meta_path = args.pmp / "private" / "mask" / "mask.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        d = meta.get("discovery") or {}
        print(f"mask: ρ={meta['mask_ratio']} source={meta['mask_source']} selected "
              f"{meta['total_selected']:,}/{meta['total_numel']:,}")
        if d:
            ious = [t["iou_prev"] for t in d["trace"] if t.get("iou_prev") is not None]
            print(f"discovery: {d['steps']} steps, stopped by {d['stop_reason']}; consecutive IoU "
                  + (f"{min(ious):.3f}–{max(ious):.3f}" if ious else "n/a")
                  + f"; IoU with final mask of first candidate {d['trace'][0]['iou_final']:.3f}")
        if meta.get("density"):
            print("density: " + ", ".join(f"{k.split('/')[-1]} {v:.1%}"
                                          for k, v in meta["density"].items()))
        print(f"private artifacts: {meta_path.parent} (never publish these)")
    bad = [r["run"] for r in rows if r["drop"] < args.min_drop]
    if bad:
        print(f"FAIL: validation loss fell by less than {args.min_drop} nat in {', '.join(bad)}")
        return 1
    print(f"OK: validation loss fell by ≥ {args.min_drop} nat in both runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
