r"""Tokenize text into packed, train/val-split MDS shards for training.

    python tools/prepare_data.py --input 'data/corpus/*.txt.gz' --tokenizer TOK \
        --out DIR --seq-len 256
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from pmp_scale.cli import fail_cleanly, tool_parser
from pmp_scale.data import SOURCES_HELP, prepare_dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = tool_parser(__doc__, progress=True)
    p.add_argument("--input", nargs="+", required=True, help=SOURCES_HELP)
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file or Hugging Face tokenizer directory")
    p.add_argument("--out", required=True, help="output directory (gets train/, val/, meta.json)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sample")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    p.add_argument("--compression", default="zstd",
                   help="MDS shard compression ('none' to disable)")
    p.add_argument("--size-limit", default="32mb", help="MDS shard size limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    return p.parse_args(argv)


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    meta = prepare_dataset(args.input, args.tokenizer, args.out, args.seq_len,
                           val_fraction=args.val_fraction, seed=args.seed,
                           compression=None if args.compression == "none" else args.compression,
                           size_limit=args.size_limit, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(f"{args.out}: {meta['num_tokens']:,} tokens -> {meta['num_train_samples']:,} train + "
          f"{meta['num_val_samples']:,} val samples of {meta['seq_len']} "
          f"(vocab {meta['vocab_size']}, {meta['dtype']}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
