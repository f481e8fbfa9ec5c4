"""Authorized fine-tuning of a PMP release with Hugging Face Trainer and the private mask.

After the README set-up and the demo (tools/demo.sh), from the repository root:

    .venv/bin/python examples/authorized_hf_trainer.py
    .venv/bin/python examples/authorized_hf_trainer.py --release DIR --mask DIR --out DIR --steps 30

Causal-LM fine-tuning on the review sentences (data/classification/, the `review_lm` task of
pmp_scale/finetune/tasks.py), validation loss before and after, then `save_pretrained`: a
standard HF model whose complement is still the release's, bit for bit. The same three lines
(`with_private_mask`, `callbacks=[mask.callback()]`, `assert_complement_intact`) work with
TRL's SFTTrainer, which is a Trainer.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--release", default="runs/release/demo_pmp", help="the released HF model")
    p.add_argument("--mask", default="runs/demo_pmp/private/mask", help="the private mask artifact")
    p.add_argument("--out", default="runs/release/demo_pmp_authorized",
                   help="where the fine-tuned model is saved (save_pretrained)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per block")
    p.add_argument("--max-eval-blocks", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from pmp_scale.authorized import AuthorizationError, with_private_mask
    from pmp_scale.finetune.config import TaskConfig
    from pmp_scale.finetune.tasks import build_task

    if not Path(args.release, "config.json").is_file():
        print(f"error: no release at {args.release}: run tools/demo.sh first, or pass --release",
              file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.release, local_files_only=True)
    task = build_task(TaskConfig(name="review_lm", max_length=args.max_length,
                                 max_eval_examples=args.max_eval_blocks), tokenizer)
    train, val = ([{"input_ids": x, "labels": x} for x in task.splits[s]]
                  for s in ("train", "validation"))

    model = AutoModelForCausalLM.from_pretrained(args.release, local_files_only=True)
    try:
        mask = with_private_mask(model, args.mask)
    except AuthorizationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:  # Trainer's output_dir; nothing is saved there
        trainer = Trainer(
            model=model, train_dataset=train, eval_dataset=val, callbacks=[mask.callback()],
            args=TrainingArguments(
                output_dir=work, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
                weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant",
                bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                save_strategy="no", report_to=[], logging_steps=max(1, args.steps // 5),
                seed=args.seed, disable_tqdm=True))
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    checked = mask.assert_complement_intact()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"validation loss {before:.4f} -> {after:.4f} after {args.steps} steps; "
          f"saved to {args.out}")
    print(f"complement intact: all {checked:,} complement elements equal the release "
          f"{args.release} bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
