"""PMP run orchestration: Stage I discovery → rewind to θ(0) → Stage II masked training.

The trainer calls `before_step` / `after_step` around every optimizer step and checkpoints the
controller like any other component. Everything here is private: θ(0), the mask and the seeds
live under `<run>/private/` and in the (private) checkpoints, never in a release.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from .. import ds_internals
from ..checkpoint import CheckpointError
from ..config import PMPConfig
from .artifact import write_artifact
from .bits import unpack_bits
from .discovery import EarlyBird, MaskSelector
from .kinds import layer_kind
from ..zero3.layout import PartitionLayout
from .sharded import SavedShards, ShardedMask
from .project import complement_norm, project_complement, radius_from
from .update import MaskedUpdate, complement_drift


def _device() -> str:
    """Where collectives' tensors must live (NCCL needs GPU tensors)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().current_device_name()


def secret_seed() -> int:
    """A seed from the OS, identical on all ranks (drawn on rank 0, broadcast)."""
    import secrets
    if not dist.is_initialized():  # one process (tools, tests): nothing to agree on
        return secrets.randbits(62)
    value = torch.tensor([secrets.randbits(62) if dist.get_rank() == 0 else 0], dtype=torch.int64,
                         device=_device())
    dist.broadcast(value, 0)
    return int(value.item())


class PMPController:
    def __init__(self, cfg: PMPConfig, engine, run_dir: str | Path, init_seed: int,
                 reset_schedule, telemetry, constant_init: list[str] = (),
                 shuffle_seed: int | None = None):
        self.cfg = cfg
        self.engine = engine
        self.private_dir = Path(run_dir) / "private"
        self.init_seed = init_seed
        self.shuffle_seed = shuffle_seed  # recorded privately; resumed with the loader's state
        self.reset_schedule = reset_schedule
        self.telemetry = telemetry
        self.rank = dist.get_rank()
        self.layout = PartitionLayout.from_engine(engine)
        # Exact names are fnmatch patterns that match only themselves (HF names have no [*?]).
        self.excluded = list(cfg.exclude) + (list(constant_init) if cfg.exclude_constant_init
                                             else [])
        self.mask_seed = cfg.mask_seed
        if cfg.mask_ratio < 1.0 and self.mask_seed is None:
            # every random choice of the mask: random masks, ties, the secrecy defences
            self.mask_seed = secret_seed()
        self.selector = MaskSelector(self.layout, cfg.mask_ratio, cfg.topk_scope, self.excluded,
                                     device=_device(), seed=self.mask_seed,
                                     secret_ties=cfg.secret_order, placement=cfg.placement,
                                     core_fraction=cfg.core_fraction,
                                     noise_epsilon=cfg.noise_epsilon, noise_clip=cfg.noise_clip)
        self.theta0 = self._snapshot_master()
        self._theta0_complete = True  # False: rebuilt from the complement (masked part unknown)
        self.discovery: EarlyBird | None = None
        self.update: MaskedUpdate | None = None
        self.mask: ShardedMask | None = None
        self.stage2_start: int | None = None
        self.project_radius: float | None = None  # absolute; fixed at the first projection
        if cfg.mask_ratio < 1.0 and cfg.mask_source == "earlybird":
            self.discovery = EarlyBird(
                self.selector, score=cfg.score, check_every=cfg.check_every,
                iou_threshold=cfg.iou_threshold, patience=cfg.patience,
                max_steps=cfg.warmup_max_steps, ema_beta=cfg.ema_beta,
                score_window=cfg.score_window)
        else:
            self._enter_stage2(self._initial_mask(), step=0, rewind=False)

    # --- stages ------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return 1 if self.stage2_start is None else 2

    def end_step(self, max_steps: int) -> int | None:
        """Total optimizer steps of the run: Stage I (unknown until it stops) + max_steps."""
        return None if self.stage2_start is None else self.stage2_start + max_steps

    def _initial_mask(self) -> ShardedMask:
        if self.cfg.mask_ratio >= 1.0:
            return self.selector.full()
        return self.selector.random(self.mask_seed)

    def _snapshot_master(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (host copies): θ(0) at construction."""
        return [t.detach().cpu().clone() for t in ds_internals.fp32_master(self.engine)]

    def _enter_stage2(self, mask: ShardedMask, step: int, rewind: bool) -> None:
        self.mask = mask
        if rewind:
            self._rewind()
        elif step > 0:
            # `rewind: none`: the complement is frozen at the end of Stage I, so that is the θ
            # the drift, `save_init` and the release audit must compare against.
            self.theta0 = self._snapshot_master()
        self.update = MaskedUpdate(self.engine, mask, self.cfg.complement)
        self.stage2_start = step
        self._log_density(step)

    @torch.no_grad()
    def _rewind(self) -> None:
        """All weights back to θ(0), fresh optimizer moments and schedule: Stage II starts
        from the initialisation as a new run would (`rewind: init`)."""
        for g, flat in enumerate(ds_internals.fp32_master(self.engine)):
            flat.copy_(self.theta0[g].to(flat.device))
        ds_internals.master_to_params(self.engine)
        ds_internals.reset_optimizer_state(self.engine)
        self.reset_schedule()

    # --- hooks (every rank, every optimizer step) -------------------------------------------------
    def before_step(self, engine, step: int) -> None:
        if self.discovery is not None and self.stage == 1:
            record = self.discovery.observe(engine)
            if record is not None:
                self.telemetry.scalars(step + 1, {"pmp/iou_prev": record["iou_prev"],
                                                  "pmp/stage": 1}, record=False)
                if record["iou_prev"] is not None:
                    self.telemetry.info(f"pmp discovery step {record['step']} | IoU with previous "
                                        f"candidate {record['iou_prev']:.4f} | streak "
                                        f"{self.discovery.streak}/{self.cfg.patience}")
        else:
            self.update.before_step(engine, step)

    def after_step(self, engine, step: int) -> None:
        done = step + 1
        if self.stage == 1:
            if self.discovery.done:
                mask = self.discovery.finish()
                self.telemetry.info(
                    f"pmp discovery stopped after {self.discovery.steps} steps: "
                    f"{self.discovery.stop_reason}; rewind={self.cfg.rewind}")
                for record in self.discovery.trace:
                    self.telemetry.scalars(record["step"], {"pmp/iou_final": record["iou_final"]},
                                           record=False)
                self._enter_stage2(mask, step=done, rewind=self.cfg.rewind == "init")
            return
        self.update.after_step(engine, step)
        if self.cfg.complement == "project" and (done - self.stage2_start) % \
                self.cfg.project_every == 0:
            if self.project_radius is None:
                self.project_radius = radius_from(
                    self.cfg, complement_norm(engine, self.mask, _device()))
            p = project_complement(engine, self.mask, self.project_radius, _device())
            self.telemetry.scalars(done, {"pmp/complement_norm": p["norm"],
                                          "pmp/project_scale": p["scale"]})
        if done % self.cfg.drift_every == 0:
            self.telemetry.scalars(done, {"pmp/complement_drift": self.drift(), "pmp/stage": 2})

    # --- measurements ------------------------------------------------------------------------------
    def drift(self) -> float:
        """Largest |θ − θ(0)| on the complement over all ranks (0.0 in frozen mode; a
        measurement, not a failure, with `complement: decay | project`)."""
        value = complement_drift(self.engine, self.mask, self.theta0).reshape(1).to(_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())

    def _log_density(self, step: int) -> None:
        kinds = sorted({layer_kind(e.name) for e in self.layout.entries})
        counts = torch.zeros(len(kinds), 2, dtype=torch.float64)
        for e, m in zip(self.layout.entries, self.mask.param_masks()):
            i = kinds.index(layer_kind(e.name))
            counts[i, 0] += m.sum().item()
            counts[i, 1] += e.slice.length
        counts = counts.to(_device())
        dist.all_reduce(counts)
        counts = counts.cpu()
        density = {f"pmp/density/{k}": (c[0] / c[1]).item() for k, c in zip(kinds, counts) if c[1]}
        self.density = density
        self.telemetry.scalars(step, {"pmp/stage": 2, **density}, record=False)
        self.telemetry.info("pmp mask density: " + ", ".join(
            f"{k.split('/')[-1]} {v:.1%}" for k, v in density.items()))

    def mask_state_bytes(self) -> int:
        """Every resident mask-related byte of this rank (each tensor once): the mask; in Stage I
        also the current candidate, the host history of candidates and the EMA scores."""
        tensors = {}
        d = self.discovery
        for m in [self.mask] + ([d.candidate, *d.history] if d is not None else []):
            if m is not None:
                tensors.update({id(b): b for b in m.bits})
        for e in (d.ema or []) if d is not None else []:
            tensors[id(e)] = e
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # --- checkpoint component ---------------------------------------------------------------------
    def _theta0_to_save(self) -> list[torch.Tensor] | None:
        """θ(0) goes into checkpoints only while it cannot be rebuilt: in Stage II the complement
        of the fp32 master *is* θ(0) (or, with `rewind: none`, the values it is frozen at), so
        resume rebuilds it from there. `save_init` also needs the masked elements' θ(0): kept."""
        return self.theta0 if self.stage == 1 or self.cfg.save_init else None

    def state_dict(self) -> dict:
        return {"init_seed": self.init_seed, "mask_seed": self.mask_seed,
                "shuffle_seed": self.shuffle_seed, "stage2_start": self.stage2_start, "theta0": self._theta0_to_save(),
                "project_radius": self.project_radius,
                "discovery": None if self.discovery is None else self.discovery.state_dict(),
                "mask": None if self.mask is None else self.mask.state_dict(),
                # what the private artifact records: export from this checkpoint writes the same
                "metadata": self.metadata()}

    def load_state_dict(self, state: dict) -> None:
        self.init_seed, self.mask_seed = state["init_seed"], state["mask_seed"]
        self.selector.seed = self.mask_seed
        self.shuffle_seed = state.get("shuffle_seed", self.shuffle_seed)
        self.project_radius = state.get("project_radius")
        # None: a Stage II checkpoint; the fp32 master (already loaded) holds it on the complement
        self.theta0 = state["theta0"] if state["theta0"] is not None else self._snapshot_master()
        self._theta0_complete = state["theta0"] is not None
        if self.update is not None:
            self.update.remove()
            self.update = None
        if state["discovery"] is not None and self.discovery is not None:
            self.discovery.load_state_dict(state["discovery"])
        self.stage2_start = state["stage2_start"]
        self.mask = None
        if state["mask"] is not None:
            self.mask = ShardedMask.from_state_dict(self.layout, state["mask"], _device())
            self.update = MaskedUpdate(self.engine, self.mask, self.cfg.complement)
            if self.discovery is not None:  # its final candidate is the mask: one copy
                self.discovery.candidate = self.mask

    def load_resharded(self, old: list[dict]) -> None:
        """Re-cut the mask and θ(0) from the states of a run with another world size."""
        first = old[0]
        if first["stage2_start"] is None:
            raise CheckpointError(
                "elastic resume during Stage I (mask discovery) is not supported: resume at the "
                f"original world size ({len(old)}) until discovery has finished")
        self.init_seed, self.mask_seed = first["init_seed"], first["mask_seed"]
        self.selector.seed = self.mask_seed
        self.shuffle_seed = first.get("shuffle_seed", self.shuffle_seed)
        self.project_radius = first.get("project_radius")
        self.stage2_start = first["stage2_start"]
        if self.discovery is not None and first["discovery"] is not None:
            self.discovery.load_state_dict({**first["discovery"], "candidate": None,
                                            "history": [], "ema": None, "acc": None})
        saved = SavedShards(old)
        masks, theta0 = [], [torch.zeros(n) for n in self.layout.sub_group_sizes]
        for e in self.layout.entries:
            mine = slice(e.slice.start, e.slice.start + e.slice.length)
            masks.append(unpack_bits(saved.packed_mask(e.name), e.slice.numel)[mine].clone())
            if saved.has_theta0:
                theta0[e.sub_group][e.offset:e.offset + e.slice.length] = saved.theta0(e.name)[mine]
        # Not saved in Stage II: the universal checkpoint just loaded holds it on the complement.
        self.theta0 = theta0 if saved.has_theta0 else self._snapshot_master()
        self._theta0_complete = saved.has_theta0
        if self.update is not None:
            self.update.remove()
        self.mask = ShardedMask.from_param_masks(self.layout, masks, _device())
        self.update = MaskedUpdate(self.engine, self.mask, self.cfg.complement)

    # --- private artifacts ---------------------------------------------------------------------------
    def write_private(self, extra_meta: dict | None = None) -> Path:
        """`<run>/private/{mask.safetensors, mask.json[, init.safetensors]}` from rank shards.

        Each rank writes its PMP state (mask shard, θ(0) with save_init) to disk; rank 0 joins
        them one parameter at a time as export does from a checkpoint (SavedShards), through the
        same writer (write_artifact) with the same metadata (`metadata`).
        """
        shard_dir = self.private_dir / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.save_init and not self._theta0_complete:
            raise CheckpointError(
                "pmp.save_init: θ(0) of the masked elements is unknown to this run (it resumed "
                "from a Stage II checkpoint written without save_init, which keeps only the "
                "complement); set save_init from the start of a run")
        torch.save({"mask": self.mask.state_dict(),
                    "theta0": self.theta0 if self.cfg.save_init else None},
                   shard_dir / f"rank{self.rank}.pt")
        dist.barrier()
        out = self.private_dir
        if self.rank == 0:
            saved = SavedShards([torch.load(shard_dir / f"rank{r}.pt", weights_only=True)
                                 for r in range(self.layout.world_size)])
            write_artifact(out / "mask",
                           ((e.name, saved.packed_mask(e.name), e.shape)
                            for e in self.layout.entries),
                           self.metadata() | (extra_meta or {}), overwrite=True,
                           theta0=saved.theta0 if self.cfg.save_init else None)
        dist.barrier()
        return out / "mask"

    def metadata(self) -> dict:
        d = self.discovery
        return {
            "mask_ratio": self.cfg.mask_ratio, "mask_source": self.cfg.mask_source,
            "score": self.cfg.score, "topk_scope": self.cfg.topk_scope,
            "exclude": self.cfg.exclude, "complement": self.cfg.complement,
            **({"project_every": self.cfg.project_every,
                "project_radius": self.cfg.project_radius,
                "project_radius_mode": self.cfg.project_radius_mode,
                "project_radius_absolute": self.project_radius}
               if self.cfg.complement == "project" else {}),
            "exclude_constant_init": self.cfg.exclude_constant_init,
            "excluded_params": self.excluded,
            "init_seed": self.init_seed, "mask_seed": self.mask_seed,
            "shuffle_seed": self.shuffle_seed, "secret_order": self.cfg.secret_order,
            "placement": self.cfg.placement, "core_fraction": self.cfg.core_fraction,
            # the settings as configured, the same as the checkpoint descriptor's (export merges both)
            "noise_epsilon": self.cfg.noise_epsilon, "noise_clip": self.cfg.noise_clip,
            "world_size": self.layout.world_size,
            "discovery": None if d is None else {
                "steps": d.steps, "stop_reason": d.stop_reason, "trace": d.trace,
                "check_every": self.cfg.check_every, "iou_threshold": self.cfg.iou_threshold,
                "score_window": self.cfg.score_window,
                "patience": self.cfg.patience, "warmup_max_steps": self.cfg.warmup_max_steps},
            "stage2_start_step": self.stage2_start,
            # What the complement equals: the initialisation, or the end of Stage I.
            "rewind": self.cfg.rewind,
            "density": getattr(self, "density", None),
        }

