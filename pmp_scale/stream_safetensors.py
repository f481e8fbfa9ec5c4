"""safetensors written one tensor at a time: the only hand-rolled safetensors header in pmp_scale.

`safetensors.torch.save_file` needs every tensor in memory at once; a release of a large model
and the mask artifact must not. With a plan (names, dtypes, shapes known up front) the header goes
first and the data is appended in order (`write_planned`); without one (a generator of packed
masks) the data goes to a scratch file and is copied behind the header at the end
(`write_unplanned`). Both produce what safetensors reads: an 8-byte length, a JSON header padded
to 8 bytes, then the raw little-endian data.

It sits outside the release package because the mask artifact, which the release reads, uses it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

# torch dtype <-> safetensors header code, both ways (one table)
DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.uint8: "U8", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
               torch.bool: "BOOL"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
PT_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes, and nothing else

# (name, dtype, shape): one planned tensor
Planned = tuple[str, torch.dtype, tuple]


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as safetensors stores them (row-major, native little-endian)."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def digest_update(h, name: str, t: torch.Tensor) -> None:
    """Release sha256: per tensor, sorted by name: name, dtype, shape, then its raw bytes."""
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    h.update(raw_bytes(t))


def header(items: Iterable[Planned], metadata: dict | None) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed header for tensors stored back to back in this order, and each
    tensor's data offset; no `__metadata__` entry when `metadata` is None."""
    head, offsets, pos = ({} if metadata is None else {"__metadata__": metadata}), {}, 0
    for name, dtype, shape in items:
        n = math.prod(shape) * dtype.itemsize
        head[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name], pos = pos, pos + n
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text, offsets


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header (metadata included), without reading any data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_planned(plan: dict[Path, list[Planned]], tensors: Iterable[tuple[str, torch.Tensor]],
                  metadata: dict | None = PT_METADATA) -> None:
    """Write files whose headers are known up front; tensors arrive one at a time, in any order
    that keeps each file's own order (each file is appended to sequentially)."""
    where, specs, files = {}, {}, []
    with contextlib.ExitStack() as stack:
        for path, items in plan.items():
            f = stack.enter_context(open(path, "wb"))
            files.append(f)
            head, offsets = header(items, metadata)
            f.write(head)
            for name, dtype, shape in items:
                where[name], specs[name] = (f, len(head) + offsets[name]), (dtype, tuple(shape))
        for name, t in tensors:
            f, pos = where.pop(name)
            if (t.dtype, tuple(t.shape)) != specs[name] or f.tell() != pos:
                raise RuntimeError(f"{name}: {t.dtype} {tuple(t.shape)} at byte {f.tell()} does not "
                                   f"match the planned {specs[name]} at byte {pos}")
            f.write(raw_bytes(t))
        if where:
            raise RuntimeError(f"tensors never written: {sorted(where)}")
        for f in files:
            _sync(f)


def write_unplanned(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                    metadata: dict | None = PT_METADATA) -> None:
    """Write one file from tensors whose names and shapes are only known once all have arrived:
    the data is streamed to a scratch file beside `path`, then copied behind the header."""
    path = Path(path)
    scratch, items = path.with_name(f".{path.name}.data"), []
    try:
        with open(scratch, "wb") as data:
            for name, t in tensors:
                items.append((name, t.dtype, tuple(t.shape)))
                data.write(raw_bytes(t))
        with open(path, "wb") as f, open(scratch, "rb") as src:
            f.write(header(items, metadata)[0])
            shutil.copyfileobj(src, f, 1 << 24)
            _sync(f)
    finally:
        scratch.unlink(missing_ok=True)
