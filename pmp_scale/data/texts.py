"""Documents from text inputs: .txt[.gz] paragraphs, .jsonl[.gz] "text" fields, or hf: specs.

Shared by tokenizer training and data preparation (each reads the same documents, in the same
order), so neither has to import the other.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator

from .loader import DataError


# What `iter_texts` reads, for the tools' --input help.
SOURCES_HELP = ".txt/.jsonl files or globs (optionally .gz), or hf:<dataset>[:<config>]:<split>"


def _open_text(path: str):
    # utf-8-sig: some Gutenberg files start with a BOM that must not become a token.
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig")


def _paragraphs(path: str) -> Iterator[str]:
    """Blank-line separated paragraphs; hard line wraps inside one become spaces."""
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if line:
                lines.append(line)
            elif lines:
                yield " ".join(lines)
                lines = []
    if lines:
        yield " ".join(lines)


def _jsonl_texts(path: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text'")
            yield row["text"]


def _hf_texts(spec: str) -> Iterator[str]:
    """`hf:<dataset>[:<config>]:<split>` -> the "text" column of datasets.load_dataset."""
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"bad dataset spec {spec!r}: use hf:<dataset>[:<config>]:<split>")
    import datasets

    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    ds = datasets.load_dataset(name, config, split=split)
    if "text" not in ds.column_names:
        raise DataError(f"{spec}: no 'text' column (columns: {ds.column_names})")
    for text in ds["text"]:
        if text:
            yield text


def expand_inputs(inputs: list[str]) -> list[str]:
    """Expand globs (sorted, so the document order is reproducible); keep hf: specs."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for spec in map(str, inputs):
        if spec.startswith("hf:"):
            files.append(spec)
            continue
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"no input file matches {spec}")
        files.extend(matches)
    if not files:
        raise DataError("no inputs given")
    return files


def iter_texts(inputs: list[str]) -> Iterator[str]:
    """Documents from .txt[.gz] (one per paragraph), .jsonl[.gz] ("text" field), or hf: specs."""
    for path in expand_inputs(inputs):
        if path.startswith("hf:"):
            yield from _hf_texts(path)
        elif path.endswith((".txt", ".txt.gz")):
            yield from _paragraphs(path)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_texts(path)
        else:
            raise DataError(f"unsupported input {path}: expected .txt, .jsonl (optionally .gz) "
                            f"or hf:<dataset>[:<config>]:<split>")
