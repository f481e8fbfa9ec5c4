"""Save / resume: DeepSpeed's ZeRO-3 files plus every stateful component in the client state.

Each rank's DeepSpeed model-states file carries that rank's client state, so per-rank
things (RNG streams, data-loader position, mask slices) live with the rank that owns them.
The train loop never pickles anything itself: it hands its components to `Checkpointer`.

A tag counts only once it is complete: every rank's files are written, fsync'ed and hashed,
then rank 0 writes `complete.json` (per-file checksums) and only then moves `latest`. Resume
verifies the checksums and falls back, with a warning, to the newest tag that verifies — so a
crash while saving, or a corrupt file (a mask slice included), never resumes silently.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from . import ds_internals
from .errors import UserError
from .faults import Faults

log = logging.getLogger("pmp_scale")

DESCRIPTOR = "pmp_scale.json"  # what the checkpoint is: checked before DeepSpeed loads it
MARKER = "complete.json"       # written last: the tag is complete and these are its checksums
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """Python, NumPy and torch (CPU + accelerator) generators of this rank."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(),
                 "torch": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def file_digest(path: Path, sync: bool = True) -> str:
    """xxh3-128 of the file (fast: checkpoints are large); when saving, also fsyncs it to disk."""
    import xxhash
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _owner(relative: str, world_size: int) -> int:
    """Rank that hashes a file: its DeepSpeed rank for per-rank files, else rank 0."""
    rank = ds_internals.file_rank(Path(relative).name)
    return 0 if rank is None else rank % world_size


INCOMPLETE = "incomplete (no completion marker: the save was interrupted)"


def tag_problem(where: Path, mine: Callable[[str], bool] = lambda name: True,
                existence: bool = True) -> str | None:
    """Why tag directory `where` is not a complete, intact checkpoint (None: it is).

    Checks the checksums of the files `mine` selects (by default all: the offline tools' check)
    and, with `existence`, that every other recorded file is there."""
    if not where.is_dir():
        return "it does not exist"
    if not (where / MARKER).is_file():
        return INCOMPLETE
    try:
        files = json.loads((where / MARKER).read_text())["files"]
    except (ValueError, KeyError):
        return f"its completion marker {MARKER} is unreadable"
    for name, digest in sorted(files.items()):
        path = where / name
        if (mine(name) or existence) and not path.is_file():
            return f"file {name} is missing"
        if mine(name) and file_digest(path, sync=False) != digest:
            return f"file {name} is corrupt (checksum mismatch)"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _WriteFailed(Exception):
    """Some rank could not write its part of a checkpoint (raised on every rank alike)."""


def _failure_reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"torch.save failed, is the disk full? ({first})"


class Checkpointer:
    def __init__(self, engine, directory: str | Path, keep: int,
                 components: dict[str, Stateful], fingerprint: dict[str, Any],
                 describe: Callable[[Path], None] | None = None, faults: Faults | None = None):
        """`fingerprint`: what a checkpoint must match on resume (model, world size…).
        `describe(dir)`: writes the model's HF config + tokenizer into `<tag>/hf` on rank 0, so
        a tag is self-contained for the release tools. `faults`: the crash tests' injection
        points inside a save (default: none)."""
        self.engine = engine
        self.faults = faults or Faults()
        self.describe = describe
        self.directory = Path(directory)
        self.keep = keep
        self.components = components
        self.fingerprint = fingerprint

    # --- save ----------------------------------------------------------------------------------
    def save(self, step: int) -> str:
        """Write tag `step` completely or not at all (a failed save leaves older tags intact).

        A write that fails on any rank (full disk, I/O error) fails the save on every rank
        together, with the same message: see `_agree`."""
        try:
            return self._save(step)
        except _WriteFailed as err:
            where = self.directory / tag_for(step)
            shutil.rmtree(where, ignore_errors=True)
            previous = [t for t in self.tags() if (self.directory / t / MARKER).is_file()]
            raise CheckpointError(
                f"could not write checkpoint {where}: {err}; the partial tag was "
                f"removed and the newest complete checkpoint ({previous[-1] if previous else 'none'})"
                " is intact — free space or change run_dir, then --resume auto") from None

    def _save(self, step: int) -> str:
        tag = tag_for(step)
        where = self.directory / tag
        rank, world = dist.get_rank(), dist.get_world_size()
        failed: list[BaseException] = []  # this rank's first write failure

        def attempt(write, *args):
            """Run one local write unless this rank already failed; record an OSError."""
            if not failed:
                try:
                    return write(*args)
                except OSError as err:
                    failed.append(err)

        if rank == 0:
            attempt(self._fresh_tag_dir, where)
        dist.barrier()
        client_state = {"pmp_step": step, ds_internals.CLIENT_STATE_KEY:
                        {k: c.state_dict() for k, c in self.components.items()}}
        with ds_internals.write_failures_recorded(self.engine, failed):
            self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state,
                                        save_latest=False)
        attempt(self.faults.point, f"save_files:{step}")
        if rank == 0:
            attempt(self._write_description, where, step)
        self._agree(failed)
        mine = attempt(lambda: {f: file_digest(where / f) for f in self._files(where)
                                if _owner(f, world) == rank})
        gathered = self._agree(failed, mine)
        if rank == 0:
            digests = {k: v for part in gathered for k, v in part.items()}
            attempt(_atomic_write, where / MARKER, json.dumps(
                {"step": step, "world_size": world, "files": digests}, indent=1))
            attempt(self.faults.point, f"save_marker:{step}")
            attempt(_atomic_write, self.directory / ds_internals.LATEST, tag)
            attempt(self._prune)
        self._agree(failed)
        return tag

    @staticmethod
    def _fresh_tag_dir(where: Path) -> None:
        if where.exists():  # a stale, incomplete attempt at this step
            shutil.rmtree(where)
        where.mkdir(parents=True)

    def _write_description(self, where: Path, step: int) -> None:
        (where / DESCRIPTOR).write_text(json.dumps({"step": step, **self.fingerprint}, indent=1))
        if self.describe is not None:
            self.describe(where / "hf")

    @staticmethod
    def _agree(failed: list[BaseException], mine: Any = None) -> list:
        """Stands in for a barrier: every rank learns whether any rank failed to write, so all
        stop together (none is left waiting in a collective) and report the same ranks. Returns
        every rank's `mine`."""
        world = dist.get_world_size()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (_failure_reason(failed[0]) if failed else None, mine))
        reasons = [f"rank {r}: {why}" for r, (why, _) in enumerate(gathered) if why]
        if reasons:
            raise _WriteFailed("; ".join(reasons))
        return [m for _, m in gathered]

    @staticmethod
    def _files(where: Path) -> list[str]:
        return sorted(str(p.relative_to(where)) for p in where.rglob("*")
                      if p.is_file() and p.name != MARKER)

    def _prune(self) -> None:
        """Keep the newest `keep` complete tags; drop older ones and stale incomplete ones."""
        tags = self.tags()
        complete = [t for t in tags if (self.directory / t / MARKER).is_file()]
        keep = set(complete[-self.keep:])
        newest = complete[-1] if complete else None
        for t in tags:
            if t not in keep and (t in complete or (newest and t < newest)):
                # marker first: a tag half-deleted by a crash must not look complete
                (self.directory / t / MARKER).unlink(missing_ok=True)
                shutil.rmtree(self.directory / t, ignore_errors=True)

    # --- resume --------------------------------------------------------------------------------
    def tags(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and _TAG.match(p.name))

    def _problem(self, tag: str) -> str | None:
        """Why `tag` cannot be resumed from (None: it verifies). Every rank checks its files."""
        rank, world = dist.get_rank(), dist.get_world_size()
        problem = tag_problem(self.directory / tag, lambda name: _owner(name, world) == rank,
                              existence=rank == 0)
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def verified(self, tag: str) -> str:
        """`tag` if it verifies on every rank, else a CheckpointError naming the problem: an
        explicitly named tag gets the checks `resumable_tag` makes, without its fallback."""
        problem = self._problem(tag)
        if problem is not None:
            raise CheckpointError(f"checkpoint {self.directory / tag} cannot be resumed from: "
                                  f"{problem}; pick another tag or --resume auto")
        return tag

    def resumable_tag(self) -> str | None:
        """Newest tag that verifies; warns about each newer one that does not."""
        skipped = []
        for tag in reversed(self.tags()):
            problem = self._problem(tag)
            if problem is None:
                for bad, why in skipped:
                    self._warn(f"checkpoint {bad} skipped: {why}; resuming from {tag} instead")
                return tag
            skipped.append((tag, problem))
        corrupt = [f"{t}: {why}" for t, why in skipped if why != INCOMPLETE]
        if corrupt:
            raise CheckpointError(f"no checkpoint in {self.directory} verifies ("
                                  + "; ".join(corrupt) + "); refusing to start over silently")
        for bad, why in skipped:
            self._warn(f"checkpoint {bad} skipped: {why}")
        return None

    @staticmethod
    def _warn(message: str) -> None:
        if dist.get_rank() == 0:
            log.warning(message)

    def load(self, tag: str) -> int:
        """Restore everything saved under `tag`; returns the step to continue from."""
        where = self.directory / tag
        if not where.is_dir():
            raise CheckpointError(f"checkpoint {where} does not exist")
        descriptor = where / DESCRIPTOR
        if not descriptor.is_file():
            raise CheckpointError(f"{where} is not a pmp_scale checkpoint (no {DESCRIPTOR})")
        saved = json.loads(descriptor.read_text())
        for key, want in self.fingerprint.items():  # before DeepSpeed reads anything
            if key != "world_size" and saved.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {where} does not match this run: {key} is "
                    f"{saved.get(key)!r} there but {want!r} here")
        old_world = saved["world_size"]
        if old_world == dist.get_world_size():
            path, client = self.engine.load_checkpoint(str(self.directory), tag=tag)
            if path is None or client is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {where}")
            states = client[ds_internals.CLIENT_STATE_KEY]
            self._check_components(where, states)
            for name, component in self.components.items():
                component.load_state_dict(states[name])
        else:
            self._load_elastic(where, old_world)
        return int(saved["step"])

    def _check_components(self, where: Path, states: dict) -> None:
        for name in self.components:
            if name not in states:
                raise CheckpointError(f"checkpoint {where} has no {name!r} state")

    def _load_elastic(self, where: Path, old_world: int) -> None:
        """World size changed: DeepSpeed's universal checkpoint + re-cut per-rank state.

        Components with `load_resharded(states_of_all_old_ranks)` re-cut their own state; the
        rest take the old rank of the same number (rank 0's for new ranks)."""
        from .elastic import load_universal, old_rank_states
        if dist.get_rank() == 0:
            log.info(f"elastic resume: {where.name} was written by {old_world} ranks, "
                     f"continuing on {dist.get_world_size()}")
        load_universal(self.engine, where)
        old = old_rank_states(where, old_world)
        self._check_components(where, old[0])
        mine = old[dist.get_rank()] if dist.get_rank() < old_world else old[0]
        for name, component in self.components.items():
            if hasattr(component, "load_resharded"):
                component.load_resharded([states[name] for states in old])
            else:
                component.load_state_dict(mine[name])
