"""Save / resume: DeepSpeed's ZeRO-3 files plus every stateful component in the client state.

Each rank's `zero_pp_rank_R_*_model_states.pt` carries that rank's client state, so per-rank
things (RNG streams, data-loader position, mask slices) live with the rank that owns them.
The train loop never pickles anything itself: it hands its components to `Checkpointer`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(RuntimeError):
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


DESCRIPTOR = "pmp_scale.json"  # what the checkpoint is: checked before DeepSpeed loads it
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


class Checkpointer:
    def __init__(self, engine, directory: str | Path, keep: int,
                 components: dict[str, Stateful], fingerprint: dict[str, Any],
                 describe: Callable[[Path], None] | None = None):
        """`fingerprint`: what a checkpoint must match on resume (model, world size…).
        `describe(dir)`: writes the model's HF config + tokenizer into `<tag>/hf` on rank 0, so
        a tag is self-contained for the release tools."""
        self.engine = engine
        self.describe = describe
        self.directory = Path(directory)
        self.keep = keep
        self.components = components
        self.fingerprint = fingerprint

    def save(self, step: int) -> str:
        tag = tag_for(step)
        client_state = {"pmp_step": step, "pmp_components": {k: c.state_dict() for k, c in self.components.items()}}
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        if dist.get_rank() == 0:
            (self.directory / tag / DESCRIPTOR).write_text(
                json.dumps({"step": step, **self.fingerprint}, indent=1))
            if self.describe is not None:
                self.describe(self.directory / tag / "hf")
            self._prune()
        dist.barrier()
        return tag

    def latest_tag(self) -> str | None:
        latest = self.directory / "latest"
        return latest.read_text().strip() if latest.is_file() else None

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
            if saved.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {where} does not match this run: {key} is "
                    f"{saved.get(key)!r} there but {want!r} here")
        path, client = self.engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None or client is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {where}")
        states = client["pmp_components"]
        for name, component in self.components.items():
            if name not in states:
                raise CheckpointError(f"checkpoint {self.directory / tag} has no {name!r} state")
            component.load_state_dict(states[name])
        return int(client["pmp_step"])

    def _prune(self) -> None:
        tags = sorted(p for p in self.directory.iterdir() if p.is_dir() and _TAG.match(p.name))
        for old in tags[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
