"""Where a ZeRO-3 checkpoint tag is, whether it is whole, and its weights read lazily.

DeepSpeed's own lazy ZeRO-3 reconstruction rebuilds each parameter from the rank files on
demand, memory-mapped, so a release holds one tensor at a time at any model or world size.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint import INCOMPLETE, tag_problem
from ..ds_internals import LATEST, MODEL_STATES, OPTIM_STATES, RANK_FILES, lazy_flat_groups
from ..errors import UserError


class ReleaseError(UserError, ValueError):
    """Input that cannot be released, exported or audited as asked; the message says why."""


def refuse_non_empty(path: Path, overwrite: bool) -> None:
    """An output directory is only replaced when asked to be."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ReleaseError(f"{path} is not empty; pass --overwrite to replace it")


def rank_files(tag_dir: Path) -> list[Path]:
    """The per-rank model-state files of a ZeRO-3 checkpoint tag, in rank order."""
    if not tag_dir.is_dir():
        raise ReleaseError(f"no checkpoint at {tag_dir}")
    names = [f.name for f in tag_dir.iterdir()]
    ranks = {int(m.group(1)): tag_dir / m.group(0) for m in map(MODEL_STATES.match, names) if m}
    optim = sorted(int(m.group(1)) for m in map(OPTIM_STATES.match, names) if m)
    if not ranks or sorted(ranks) != list(range(len(ranks))) or optim != sorted(ranks):
        found = sorted(n for n in names if n.endswith(".pt")) or "no .pt files"
        raise ReleaseError(f"{tag_dir} is not a ZeRO-3 checkpoint: expected {RANK_FILES} "
                           f"for R = 0..W-1, found {found}")
    return [ranks[r] for r in range(len(ranks))]


def resolve_checkpoint(path, tag: str | None = None, verify: bool = True) -> Path:
    """The tag directory meant by a run dir, its `checkpoints/` dir or a tag dir (`latest` by default).

    With `verify`, the tag must be complete (the trainer's completion marker) and every file
    must match its recorded checksum: a crash mid-save or a corrupt shard is never released."""
    path = Path(path)
    if not path.exists():
        raise ReleaseError(f"no checkpoint at {path}: it does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if tag is not None and path.name != tag:
        path = path / tag
    elif tag is None and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    rank_files(path)
    problem = tag_problem(path) if verify else None
    if problem is not None:
        hint = (" (a ZeRO-3 checkpoint not written by pmp_scale has no marker: release it with "
                "tools/release.py --unverified)" if problem == INCOMPLETE else "")
        raise ReleaseError(f"checkpoint {path} is not usable: {problem}; name another with "
                           f"--tag{hint}")
    return path


# --- lazy reads of the rank files ------------------------------------------------------------
@contextlib.contextmanager
def _mmap_torch_loads():
    """DeepSpeed's reader torch.loads each rank's whole model-state file, client state (θ(0)
    slices: model-sized) included, to read a few small entries; memory-mapped, the rest stays on disk."""
    from torch.utils.serialization import config
    before, config.load.mmap = config.load.mmap, True
    try:
        yield
    finally:
        config.load.mmap = before


def lazy_state_dict(tag_dir: Path) -> dict:
    """name -> lazy fp32 tensor (`.contiguous()` materialises it) from DeepSpeed's ZeRO-3
    reconstruction; tied aliases (GPT-2 lm_head = wte) are dropped, as save_pretrained drops them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    rank_files(tag_dir)
    try:
        with _mmap_torch_loads(), open(os.devnull, "w") as quiet, \
                contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its prints and bars
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name,
                                                            lazy_mode=True)
    except ValueError as e:
        raise ReleaseError(f"{tag_dir}: DeepSpeed cannot rebuild this checkpoint: {e}") from e
    seen, out = set(), {}
    for name, tensor in full.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


_MADV_PAGEOUT = 21  # Linux >= 5.4


def page_out(lazy: Mapping) -> None:
    """Give the pages of the memory-mapped fp32 partitions back to the kernel.

    Touched pages of a mapping count towards RSS until unmapped, so streaming a multi-GB
    checkpoint would end with all of it resident. MADV_PAGEOUT never loses data: clean file
    pages are simply read again if touched again. A no-op where unsupported.
    """
    if sys.platform != "linux":
        return
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for rank_groups in lazy_flat_groups(lazy):
        for flat in rank_groups:
            start = flat.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
            madvise(start, flat.data_ptr() + flat.numel() * flat.element_size() - start, _MADV_PAGEOUT)
