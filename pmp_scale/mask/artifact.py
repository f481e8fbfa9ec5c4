"""The private mask artifact: one packed bit per parameter element, by HF parameter name.

    <dir>/mask.safetensors  name -> uint8[ceil(numel/8)] == numpy.packbits(full_mask.flatten())
    <dir>/mask.json         caller's metadata + shapes, numel, selected, totals, format_version
    <dir>/init.safetensors  θ(0) by name, full fp32 tensors (optional: pmp.save_init, export --init)

Stored unsharded so that it is independent of the world size that produced it; ranks of any
world size cut their ZeRO-3 slices out of it (reslice_artifact). It is never part of a release.
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from ..stream_safetensors import write_planned, write_unplanned
from .bits import pack_bits, popcount, unpack_bits
from ..zero3.layout import LocalSlice

MASK_FILE = "mask.safetensors"
META_FILE = "mask.json"
INIT_FILE = "init.safetensors"
FORMAT_VERSION = 1


class MaskArtifactError(UserError, ValueError):
    """A mask artifact that is missing, malformed or inconsistent with its metadata."""


def merge_rank_slices(rank_bits: list[torch.Tensor], rank_lengths: list[int]) -> torch.Tensor:
    """Full packed mask of one parameter from its per-rank packed slices, in rank order."""
    return pack_bits(torch.cat([unpack_bits(b, n) for b, n in zip(rank_bits, rank_lengths, strict=True)]))


def slice_for_rank(full_packed: torch.Tensor, numel: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a full packed mask, as bools; only its own bytes are unpacked."""
    if full_packed.numel() != (numel + 7) // 8:
        raise ValueError(f"{full_packed.numel()} bytes cannot hold a mask of {numel} elements")
    s = LocalSlice.for_rank(0, numel, rank, world_size)
    if s.length == 0:
        return torch.zeros(0, dtype=torch.bool, device=full_packed.device)
    lo, hi = s.start // 8, (s.start + s.length + 7) // 8
    bits = unpack_bits(full_packed[lo:hi], (hi - lo) * 8)
    return bits[s.start - lo * 8: s.start - lo * 8 + s.length]


def _problem(dtype: str, shape: list[int], numel: int, last_byte: int | None) -> str | None:
    """Why a stored packed mask is wrong for numel elements, or None if it is right."""
    nbytes = (numel + 7) // 8
    if dtype != "U8":
        return f"dtype {dtype}, expected uint8 (U8)"
    if shape != [nbytes]:
        return f"shape {shape}, expected [{nbytes}] (ceil({numel}/8) bytes)"
    if numel % 8 and last_byte is not None and last_byte & ((1 << (8 - numel % 8)) - 1):
        return f"padding bits of the last byte are set (byte {last_byte:#04x}, {numel} elements)"
    return None


def _dtype_code(t: torch.Tensor) -> str:
    return "U8" if t.dtype == torch.uint8 else str(t.dtype)


def _fsync_write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_artifact(out_dir, packed_by_name: Iterable[tuple[str, torch.Tensor, tuple[int, ...]]],
                   meta: dict, overwrite: bool = False,
                   theta0: Callable[[str], torch.Tensor] | None = None) -> None:
    """Write the artifact from (name, packed, shape) items, one parameter in memory at a time.

    The one writer of a private artifact: the trainer's (PMPController.write_private) and the
    export from a checkpoint (release/export.py) both come here. The items come from a
    generator, so the safetensors header is only known at the end (write_unplanned); with
    `theta0` (name -> that parameter's θ(0)), init.safetensors is streamed after it, fp32 and
    HF-shaped. The directory is staged (a crash never leaves a partial artifact). Fields
    computed here (shapes, numel, selected, totals, format_version) replace any the caller passed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
    shapes, numel, selected = {}, {}, {}

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, packed, shape in packed_by_name:
            if name in shapes:
                raise ValueError(f"duplicate parameter name {name!r}")
            n = math.prod(shape)
            problem = _problem(_dtype_code(packed), list(packed.shape), n,
                               int(packed[-1]) if packed.numel() else None)
            if problem:
                raise ValueError(f"packed mask of {name!r} {tuple(shape)}: {problem}")
            shapes[name], numel[name], selected[name] = list(shape), n, popcount(packed)
            yield name, packed
    with staged_directory(out_dir) as tmp:
        write_unplanned(tmp / MASK_FILE, checked(), metadata=None)
        if theta0 is not None:
            plan = {tmp / INIT_FILE: [(n, torch.float32, tuple(s)) for n, s in shapes.items()]}
            write_planned(plan, ((n, theta0(n).float().reshape(s)) for n, s in shapes.items()))
        meta = {**meta, "format_version": FORMAT_VERSION, "shapes": shapes, "numel": numel,
                "selected": selected, "total_numel": sum(numel.values()),
                "total_selected": sum(selected.values())}
        _fsync_write_text(tmp / META_FILE, json.dumps(meta, indent=1))


def update_metadata(dir, **fields) -> None:
    """Set fields of an artifact's mask.json, atomically (rename over the old file)."""
    path = Path(dir) / META_FILE
    meta = json.loads(path.read_text())
    meta.update(fields)
    tmp = path.with_name(f".{META_FILE}.tmp")
    _fsync_write_text(tmp, json.dumps(meta, indent=1))
    os.replace(tmp, path)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """rename() replaces a missing or empty directory atomically; a full one is swapped out first."""
    if out_dir.exists() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write into, renamed into place when the block ends
    and removed if it raises: readers see the old directory or the whole new one, never a part."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _PackedTensors(Mapping):
    """name -> packed mask, read from the memory-mapped safetensors file when accessed."""

    def __init__(self, handle, names: list[str]):
        self._handle, self._names = handle, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_artifact(dir) -> tuple[Mapping[str, torch.Tensor], dict]:
    """(name -> packed uint8 mask, loaded lazily; metadata), after validating the whole artifact."""
    dir = Path(dir)
    meta_path, mask_path = dir / META_FILE, dir / MASK_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise MaskArtifactError(f"{meta_path}: cannot read mask metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION \
            or not isinstance(meta.get("shapes"), dict):
        raise MaskArtifactError(f"{meta_path}: expected format_version {FORMAT_VERSION} and a 'shapes' "
                                f"table, got format_version={meta.get('format_version') if isinstance(meta, dict) else meta!r}")
    try:
        handle = safe_open(str(mask_path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers and I/O
        raise MaskArtifactError(f"{mask_path}: cannot open: {e}") from e
    names, stored = list(meta["shapes"]), set(handle.keys())
    if set(names) != stored:
        raise MaskArtifactError(f"{mask_path}: names differ from {META_FILE}: missing "
                                f"{sorted(set(names) - stored)}, unexpected {sorted(stored - set(names))}")
    for name in names:
        numel, part = math.prod(meta["shapes"][name]), handle.get_slice(name)
        shape = part.get_shape()
        last = int(part[shape[0] - 1:][0]) if part.get_dtype() == "U8" and shape and shape[0] else None
        problem = _problem(part.get_dtype(), shape, numel, last)
        if problem:
            raise MaskArtifactError(f"{mask_path}: {name!r} {meta['shapes'][name]}: {problem}")
    return _PackedTensors(handle, names), meta


def reslice_artifact(dir, names_in_order: list[str], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's ZeRO-3 slices (bools) of the named parameters, for any world size."""
    tensors, meta = read_artifact(dir)
    missing = [n for n in names_in_order if n not in tensors]
    if missing:
        raise MaskArtifactError(f"{Path(dir) / MASK_FILE}: no mask for {missing}")
    return {name: slice_for_rank(tensors[name], math.prod(meta["shapes"][name]), rank, world_size)
            for name in names_in_order}
