"""Text -> tokenized, packed, train/val-split MDS shards that `build_loader` streams, and their
first samples read back without a loader (`read_prepared_tokens`).

Layout of a prepared directory:
    meta.json          what the data is (seq_len, tokenizer fingerprint, counts, ...)
    train/, val/       streaming MDS shards, one column "tokens" of exactly seq_len ids
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .loader import FORMAT_VERSION, SPLITS, DataError, read_meta
from .texts import expand_inputs, iter_texts
from .tokenizer import load_tokenizer


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    """A document's split depends only on its text and the seed: reordering inputs does not move
    documents, and exact duplicates never straddle train and val."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


class _Packer:
    """Concatenates documents (each followed by EOS) and writes every full seq_len window."""

    def __init__(self, out_dir: Path, seq_len: int, dtype, writer_kwargs: dict):
        from streaming import MDSWriter

        self.seq_len, self.dtype = seq_len, dtype
        self.writer = MDSWriter(out=str(out_dir), **writer_kwargs)
        self.buffer = np.empty(0, dtype)
        self.num_samples = self.num_docs = self.num_tokens = 0

    def add(self, docs: list[list[int]], eos_id: int) -> None:
        if not docs:
            return
        flat: list[int] = []
        for doc in docs:
            flat.extend(doc)
            flat.append(eos_id)
        stream = np.asarray(flat, dtype=self.dtype)
        self.num_docs += len(docs)
        self.num_tokens += len(stream)
        self.buffer = np.concatenate([self.buffer, stream])
        n = len(self.buffer) // self.seq_len
        for row in self.buffer[: n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({"tokens": row})
        self.buffer = self.buffer[n * self.seq_len:].copy()
        self.num_samples += n

    def finish(self) -> None:
        self.writer.finish()  # the incomplete tail in self.buffer is dropped


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output directory is not empty: {out} (pass overwrite=True / "
                            f"--overwrite to replace it)")
        if not (out / "meta.json").is_file():
            # Overwrite replaces datasets, never arbitrary directories.
            raise DataError(f"refusing to overwrite {out}: it is not a prepared dataset "
                            f"(no meta.json)")


def prepare_dataset(inputs, tokenizer_path, out_dir, seq_len: int, val_fraction: float = 0.05,
                    seed: int = 0, compression: str | None = "zstd",
                    hashes=("sha1", "xxh64"), size_limit="32mb", overwrite: bool = False,
                    progress: bool = True, batch_docs: int = 1024) -> dict:
    """Tokenize documents, append EOS to each, pack into seq_len samples, write MDS shards.

    Whole documents go to train or val, so validation text is never seen in training. Each split
    drops its final partial sample. Everything is written into a temporary directory beside
    `out_dir` and renamed at the end, so `out_dir` is either complete or absent. Returns meta.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer_path)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    dtype_name = np.dtype(dtype).name
    writer_kwargs = dict(columns={"tokens": f"ndarray:{dtype_name}"}, compression=compression,
                         hashes=list(hashes), size_limit=size_limit, progress_bar=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        packers = {s: _Packer(tmp / s, seq_len, dtype, writer_kwargs) for s in SPLITS}
        pending: dict[str, list[str]] = {s: [] for s in SPLITS}

        def flush(split: str) -> None:
            packers[split].add(tok.encode_batch(pending[split]), tok.eos_id)
            pending[split] = []

        from tqdm import tqdm

        with tqdm(desc="tokenizing", unit=" docs", disable=not progress) as bar:
            for text in iter_texts(files):
                split = "val" if _is_val(text, seed, val_fraction) else "train"
                pending[split].append(text)
                if len(pending[split]) >= batch_docs:
                    flush(split)
                    bar.update(batch_docs)
                    bar.set_postfix(tokens=sum(p.num_tokens for p in packers.values()))
            for split in SPLITS:
                bar.update(len(pending[split]))
                flush(split)
        for packer in packers.values():
            packer.finish()

        for split, packer in packers.items():
            if packer.num_samples == 0:
                raise DataError(f"the {split} split has no complete sample of {seq_len} tokens "
                                f"({packer.num_tokens} tokens from {packer.num_docs} documents): "
                                f"add data, or lower seq_len / change val_fraction")
        meta = {
            "format_version": FORMAT_VERSION,
            "seq_len": seq_len,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype_name,
            "tokenizer_path": os.fspath(tokenizer_path),
            "tokenizer_fingerprint": tok.fingerprint(),
            "num_train_samples": packers["train"].num_samples,
            "num_val_samples": packers["val"].num_samples,
            "num_train_docs": packers["train"].num_docs,
            "num_val_docs": packers["val"].num_docs,
            "num_tokens": sum(p.num_tokens for p in packers.values()),
            "val_fraction": val_fraction,
            "seed": seed,
            "inputs": files,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_prepared_tokens(data_dir, split: str = "val", limit: int | None = None):
    """LongTensor[N, seq_len]: the first samples of prepared MDS shards, read shard by shard with
    streaming's reader. Not `data.build_loader` on purpose: its shared memory (and the stale-
    memory cleanup it runs) would disturb training jobs beside this one, and it unpacks
    compressed shards in place, where this unpacks into a temporary directory."""
    import itertools
    import tempfile

    import torch
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    read_meta(str(data_dir))
    split_dir = Path(data_dir) / split
    index = json.loads((split_dir / "index.json").read_text())

    def samples(tmp: Path):
        for shard in index["shards"]:
            root, raw = Path(data_dir), shard["raw_data"]["basename"]
            if not (split_dir / raw).is_file():  # only the compressed shard is there
                (tmp / split).mkdir(exist_ok=True)
                zipped = (split_dir / shard["zip_data"]["basename"]).read_bytes()
                (tmp / split / raw).write_bytes(decompress(shard["compression"], zipped))
                root = tmp
            reader = reader_from_json(str(root), split, shard)
            yield from (reader.get_item(i)["tokens"] for i in range(reader.samples))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [np.asarray(t, dtype=np.int64) for t in itertools.islice(samples(Path(tmp)), limit)]
    if not rows:
        raise DataError(f"{split_dir}: no samples")
    return torch.from_numpy(np.stack(rows))
