r"""Train a Llama-style SentencePiece tokenizer (BPE by default) on text files.

    python tools/train_tokenizer.py --input 'data/corpus/*.txt.gz' --vocab-size 4096 \
        --out data/demo/spm4k
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from tqdm import tqdm

from pmp_scale.cli import fail_cleanly, tool_parser
from pmp_scale.data import SOURCES_HELP, iter_texts, load_tokenizer, train_sentencepiece


def parse_args(argv=None) -> argparse.Namespace:
    p = tool_parser(__doc__, progress=True)
    p.add_argument("--input", nargs="+", required=True, help=SOURCES_HELP)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True,
                   help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    return p.parse_args(argv)


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    model = train_sentencepiece(args.input, args.out, args.vocab_size, args.model_type)
    tok = load_tokenizer(model)
    n_tokens = n_docs = 0
    texts = iter_texts(args.input)
    with tqdm(desc="measuring", unit=" docs", disable=args.quiet) as bar:
        while batch := list(itertools.islice(texts, 1024)):
            n_tokens += sum(map(len, tok.encode_batch(batch)))
            n_docs += len(batch)
            bar.update(len(batch))
    print(f"{model}: vocab {tok.vocab_size}, {n_tokens:,} tokens in {n_docs:,} documents "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
