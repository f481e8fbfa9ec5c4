"""Try to recover a release's private mask, as an attacker would; score it as its owner.

    python tools/attack_mask.py release/demo_pmp --out runs/attack/demo_pmp \\
        [--private runs/demo_pmp/private/mask] [--public data/demo/mds] \\
        [--shadow-config configs/attack/demo_shadow.yaml] [--payoff configs/finetune/review_lm.yaml]

The attacker's inputs only: the release; optionally public text (a prepared MDS dir, or
.txt/.jsonl[.gz] files tokenized with the release's own tokenizer), guessed seeds, a shadow run
of pmp_scale itself. Every attack writes a predicted mask in the private-artifact format
(`<out>/masks/<attack>/`, usable for authorized fine-tuning with allow_unbound_mask). With
--private (the owner's view) each attack is scored: ROC AUC (global, per layer group, per
tensor), precision/recall at the true complement size, an ROC plot; with --payoff, authorized
fine-tuning with the best recovered mask against the true mask and unauthorized fine-tuning.
Writes attack.md, attack.json, roc.png.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmp_scale.cli import add_verbose_flag, fail_cleanly, quiet_third_party, tool_parser  # noqa: E402


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


@fail_cleanly
def main(argv=None) -> int:
    from pmp_scale.secrecy import AttackError, run_attacks
    p = tool_parser(__doc__)
    add_verbose_flag(p)
    p.add_argument("release", type=Path)
    p.add_argument("--out", type=Path, required=True, help="report directory (replaced atomically)")
    p.add_argument("--private", type=Path, help="the true mask artifact: score every attack")
    p.add_argument("--public", help="public text: a prepared MDS dir or .txt/.jsonl[.gz] glob")
    p.add_argument("--attacks", type=_csv, help="comma-separated subset (default: all the "
                   "inputs allow), e.g. bits,constant,magnitude,seed_guess,grad_abs,shadow")
    p.add_argument("--seeds", type=_csv, default=[], help="init seeds to guess (default: 22 "
                   "common ones: 0-10, 17, 42, 123, 1234, 1337, 2023-2025, 3407, 12345, 31337)")
    p.add_argument("--ratio", type=float, help="ρ for the predicted masks (default: the true "
                   "share with --private, else 0.7)")
    p.add_argument("--k", type=_csv, default=["1", "4", "16", "64"],
                   help="numbers of public batches for the gradient attacks")
    p.add_argument("--shadow-config", type=Path, help="a pmp_scale run config: the attacker's "
                   "own PMP run (same architecture) trained through launchers/pretrain.py")
    p.add_argument("--shadow-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the shadow run's config (repeatable)")
    p.add_argument("--shadow-dir", type=Path, help="where the shadow run lives (reused when "
                   "finished; default <out>-shadow)")
    p.add_argument("--shadow-ranks", type=int, default=2)
    p.add_argument("--shadow-stage2-steps", type=int, metavar="N", help="the target's Stage II "
                   "length, when known (a release records none): the shadow trains as long after "
                   "its own discovery, so its masked weights drift as far as the target's")
    p.add_argument("--payoff", type=Path, help="a fine-tuning config (e.g. configs/finetune/"
                   "review_lm.yaml): fine-tune with the best recovered mask (needs --private)")
    args = p.parse_args(argv)
    # the one in-process rank (DeepSpeed reads LOCAL_RANK from the environment only)
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_third_party(args.verbose)
    if args.public is None and args.attacks and any(
            a.split("@")[0] in ("grad_abs", "fisher", "displacement", "structural")
            for a in args.attacks):
        raise AttackError("the gradient, displacement and structural attacks need --public text")
    if args.payoff is not None and args.private is None:
        raise AttackError("--payoff compares with the true mask: give --private too")
    shadow = None
    if args.shadow_config is not None:
        if not args.shadow_config.is_file():
            raise AttackError(f"shadow config {args.shadow_config} not found")
        if args.shadow_stage2_steps is not None and args.shadow_stage2_steps < 1:
            raise AttackError(f"--shadow-stage2-steps {args.shadow_stage2_steps}: give the "
                              "target's number of Stage II steps (≥ 1)")
        stage2 = ([] if args.shadow_stage2_steps is None  # Stage II runs train.max_steps steps
                  else [f"train.max_steps={args.shadow_stage2_steps}"])
        shadow = {"config": args.shadow_config, "overrides": [*stage2, *args.shadow_set],
                  "ranks": args.shadow_ranks,
                  "workdir": args.shadow_dir or args.out.with_name(args.out.name + "-shadow")}
    result = run_attacks(args.release, args.out, private_dir=args.private, public=args.public,
                         attacks=args.attacks, seeds=[int(s) for s in args.seeds] or None,
                         ratio=args.ratio, ks=tuple(int(k) for k in args.k), shadow=shadow,
                         payoff_config=args.payoff)
    print((args.out / "attack.md").read_text())
    print(f"report: {args.out}/attack.md ({len(result['attacks'])} attacks"
          + (f", {len(result['leaks'])} leak(s) over the audit rule)" if args.private else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
