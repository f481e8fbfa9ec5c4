"""DeepSpeed ZeRO-3 pre-training: the run's components and the one train loop.

The ZeRO-3 mechanics (config, engine, the optimizer step with the PMP hooks) live in `zero3/`,
shared with fine-tuning; when to save and when to stop live in `policies.py` and
`preemption.py`; throughput in `telemetry.py`. What is left here is the wiring and the loop.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .checkpoint import Checkpointer, RNGState, tag_for
from .cluster import check_shared_run_dir
from .config import RunConfig
from .data import DataError, batches, build_loader, load_tokenizer, read_meta
from .faults import Faults
from .models import build_hf_config, build_model, count_params, flops_per_token
from .policies import Divergence, SaveSchedule
from .preemption import Preemption
from .telemetry import Telemetry, ThroughputWindow, memory_gib, peak_tflops
from .zero3 import (DTYPES, SkippedSteps, StepHook, build_ds_config, build_engine,
                    init_distributed, init_master, mean_over_ranks, on_cpu, optimizer_step,
                    resolve_precision, restart_schedule, warmup_decay)


# PMP settings a checkpoint's mask and discovery state depend on: resuming with others would
# silently train a different method.
PMP_IDENTITY = {"mask_ratio", "mask_source", "score", "topk_scope", "exclude",
                "exclude_constant_init", "rewind", "complement", "secret_order", "placement",
                "core_fraction", "noise_epsilon", "noise_clip"}


def data_order_seed(cfg: RunConfig) -> int:
    """The run's data.shuffle_seed, or (null: a PMP run's default) one drawn from the OS,
    identical on all ranks, so that a shadow run cannot replay the target's batches."""
    if cfg.data.shuffle_seed is not None:
        return cfg.data.shuffle_seed
    from .mask.controller import secret_seed
    return secret_seed()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _set_cpu_threads() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


class TrainState(SkippedSteps):
    """Counters that must survive a resume."""

    def __init__(self):
        self.step = 0
        self.tokens = 0
        super().__init__()  # skipped, bad_streak

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


class Trainer:
    """Owns every component of a run; `train()` is the only loop."""

    def __init__(self, cfg: RunConfig, hooks: list[StepHook] | None = None,
                 faults: Faults | None = None):
        # Everything that can be checked without a process group is checked first.
        self.cfg = cfg
        self.faults = faults or Faults()  # the crash tests' injection points; no-op
        self.world_size = world_size_from_env()
        self.grad_accum = cfg.grad_accum_steps(self.world_size)
        self.meta = read_meta(cfg.data.path)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.fingerprint() != self.meta.get("tokenizer_fingerprint"):
            raise DataError(
                f"tokenizer mismatch: {cfg.data.tokenizer} is not the tokenizer the data in "
                f"{cfg.data.path} was prepared with ({self.meta.get('tokenizer_path')})")
        self.seq_len = int(self.meta["seq_len"])
        self.hf_config = build_hf_config(cfg.model.preset, cfg.model.overrides,
                                         tokenizer_vocab_size=self.tokenizer.vocab_size)
        if self.seq_len > getattr(self.hf_config, "max_position_embeddings",
                                  getattr(self.hf_config, "n_positions", self.seq_len)):
            raise DataError(f"data seq_len {self.seq_len} exceeds the model's context length")
        self.precision = resolve_precision(cfg.train.precision)
        self.hooks = list(hooks or [])

        init_distributed()
        if on_cpu():
            _set_cpu_threads()
        self.rank = dist.get_rank()
        if dist.get_world_size() != self.world_size:
            raise RuntimeError("WORLD_SIZE does not match the process group")
        self.run_dir = Path(cfg.run_dir)
        check_shared_run_dir(self.run_dir)  # before anything is built or trained
        self.telemetry = Telemetry(self.run_dir, self.rank, cfg.logging.tensorboard)
        self.ds_config = build_ds_config(cfg, self.world_size, self.precision)
        self.n_params = count_params(self.hf_config)
        self.flops_per_token = flops_per_token(self.hf_config, self.n_params, self.seq_len)
        self.peak_tflops = peak_tflops(cfg.logging.peak_tflops)

        self.init_seed = cfg.seed
        if self.init_seed is None:
            from .mask.controller import secret_seed
            self.init_seed = secret_seed()
        self.engine = self._build_engine(self.init_seed)
        # A secret order is kept like the init seed: in the private checkpoints (the loader's
        # state carries it, so a resume continues the same order) and in mask.json.
        self.shuffle_seed = data_order_seed(cfg)
        self.train_loader = build_loader(
            cfg.data.path, "train", cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
            seed=self.shuffle_seed, num_canonical_nodes=cfg.data.num_canonical_nodes,
            local_cache=cfg.data.local_cache, num_workers=cfg.data.num_workers)
        self.val_batches = self._load_val_batches()
        self.state = TrainState()
        self.resumed_from: str | None = None  # the checkpoint tag this process started from
        self.rng = RNGState()
        components = {"train": self.state, "data": self.train_loader, "rng": self.rng}
        self.pmp = None
        if cfg.pmp.enabled:
            from .mask.controller import PMPController
            self.pmp = PMPController(cfg.pmp, self.engine, self.run_dir, self.init_seed,
                                     functools.partial(restart_schedule, self.engine,
                                                       self.schedule), self.telemetry,
                                     constant_init=self.constant_init,
                                     shuffle_seed=self.shuffle_seed)
            self.hooks.append(self.pmp)
            components["pmp"] = self.pmp
        self.checkpointer = Checkpointer(
            self.engine, self.run_dir / "checkpoints", cfg.checkpoint.keep,
            components=components,
            fingerprint={"preset": cfg.model.preset, "n_params": self.n_params,
                         "world_size": self.world_size, "seq_len": self.seq_len,
                         "pmp": cfg.pmp.enabled and cfg.pmp.model_dump(include=PMP_IDENTITY)},
            describe=self._describe_model, faults=self.faults)

    def _describe_model(self, out_dir: Path) -> None:
        """HF config (no training or PMP keys) + tokenizer files, as a release needs them."""
        from transformers import GenerationConfig
        cfg = copy.deepcopy(self.hf_config)
        # Special tokens are the tokenizer's (a preset's defaults may not exist in this vocab);
        # the KV cache is off for training only.
        cfg.bos_token_id, cfg.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
        cfg.use_cache = True
        cfg.save_pretrained(out_dir)
        GenerationConfig.from_model_config(cfg).save_pretrained(out_dir)
        self.tokenizer.save_hf(out_dir)

    # --- construction -------------------------------------------------------------------
    def _build_engine(self, seed: int):
        self.model = build_model(self.hf_config, self.ds_config, DTYPES[self.precision])
        o = self.cfg.optim
        self.schedule = warmup_decay(o.warmup_steps, self.cfg.train.max_steps, o.min_lr_ratio,
                                     o.schedule)
        engine = build_engine(self.model, o, self.ds_config, self.schedule)
        self.constant_init = init_master(engine, seed)
        return engine

    def _load_val_batches(self) -> list[dict[str, torch.Tensor]]:
        """A fixed held-out set, read once, so every evaluation sees the same tokens."""
        loader = build_loader(self.cfg.data.path, "val", self.cfg.train.micro_batch_size,
                              shuffle=False, seed=0,
                              num_canonical_nodes=self.cfg.data.num_canonical_nodes,
                              local_cache=self.cfg.data.local_cache)
        held_out = []
        for batch in batches(loader, epochs=1):
            held_out.append(batch)
            if len(held_out) == self.cfg.train.eval_batches:
                break
        if not held_out:
            raise DataError(f"validation split of {self.cfg.data.path} is empty")
        return held_out

    # --- steps ---------------------------------------------------------------------------
    def _forward(self, batch) -> torch.Tensor:
        ids = batch["input_ids"].to(self.engine.device)
        return self.engine(input_ids=ids, labels=ids).loss

    def train_step(self, batches) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        losses = (self._forward(next(batches)) for _ in range(self.grad_accum))
        return optimizer_step(
            self.engine, losses, self.hooks, self.state.step, self.state,
            check_finite=self.precision != "fp16",  # fp16: its loss scaler skips overflows
            after_backward=lambda: self.faults.point(f"backward:{self.state.step + 1}"))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total = torch.zeros((), device=self.engine.device)
        for batch in self.val_batches:
            total += self._forward(batch).float()
        self.engine.train()
        return mean_over_ranks(total / len(self.val_batches), self.engine.device)

    def _batches(self):
        """Micro-batches forever: each pass over the loader is one epoch (state resumes)."""
        return batches(self.train_loader)

    # --- loop -------------------------------------------------------------------------------
    def resume(self, spec: str | None) -> None:
        """`spec`: None (fresh), "auto" (newest checkpoint if any) or a tag name."""
        if spec is None:
            return
        tag = (self.checkpointer.resumable_tag() if spec == "auto"
               else self.checkpointer.verified(spec))
        if tag is None:
            self.telemetry.info("resume auto: no checkpoint yet, starting fresh")
            return
        step = self.checkpointer.load(tag)
        self.resumed_from = tag
        self.telemetry.info(f"resumed from {tag} (step {step})")

    def summary(self) -> str:
        c = self.cfg
        return (f"model {c.model.preset} {self.n_params / 1e6:.2f}M params | world {self.world_size}"
                f" | global batch {c.train.global_batch_size} = micro {c.train.micro_batch_size}"
                f" x accum {self.grad_accum} x ranks {self.world_size} | seq {self.seq_len}"
                f" | {self.precision} | steps {c.train.max_steps}"
                f" | peak TFLOP/s {self.peak_tflops or 'n/a'}")

    def train(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to the end (or only up to step `stop_at`, then checkpoint and return)."""
        c = self.cfg
        self.telemetry.info(self.summary())
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(c.model_dump(mode="json")))
        if self.state.step == 0:
            self.telemetry.scalars(0, self._validate(0))
        batches = self._batches()
        preemption = Preemption(c.checkpoint.preempt_grace_s)
        try:
            return self._loop(batches, preemption, stop_at)
        finally:
            preemption.close()
            self.telemetry.close()

    def _loop(self, batches, preemption: Preemption, stop_at: int | None) -> dict[str, float]:
        c = self.cfg
        saves = SaveSchedule(c.checkpoint.every, stop_at)
        divergence = Divergence(c.train.nonfinite_max_in_a_row, self.telemetry)
        window = ThroughputWindow(c.train.global_batch_size * self.seq_len, self.flops_per_token,
                                  self.world_size, self.peak_tflops)
        metrics = {}
        while not self._finished():
            loss = self.train_step(batches)
            step = self._advance(window)
            self.faults.point(f"step:{step}")
            last_step = self._finished()
            metrics = self._step_metrics(loss)
            if step % c.train.log_every == 0 or last_step:
                metrics.update(window.measure())
                self._log_step(step, metrics)
            if step % c.train.eval_every == 0 or last_step:
                metrics.update(self._validate(step))
            self.telemetry.scalars(step, metrics)
            diverged = divergence.check(step, self.state.bad_streak)
            preempted = preemption.requested()
            if saves.due(step, last=last_step, stopping=diverged or preempted):
                self.checkpointer.save(step)
            if diverged:
                divergence.stop(step, self.state.bad_streak)
            if preempted:
                self.telemetry.info(f"preempted: checkpoint {tag_for(step)} written, exiting")
                return metrics
            if step == stop_at:
                return metrics
        if self.pmp is not None:
            path = self.pmp.write_private()
            self.telemetry.info(f"pmp private artifacts written to {path} (keep them secret)")
        return metrics

    def _advance(self, window: ThroughputWindow) -> int:
        self.state.step += 1
        self.state.tokens += self.cfg.train.global_batch_size * self.seq_len
        window.tick()
        return self.state.step

    def _step_metrics(self, loss: float) -> dict[str, float]:
        metrics = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                   "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                   "train/skipped_steps": self.state.skipped}
        if self.pmp is not None:
            metrics["pmp/stage"] = self.pmp.stage
        return metrics

    def _log_step(self, step: int, metrics: dict[str, float]) -> None:
        """The step's console line; memory figures join its metrics."""
        metrics.update({f"mem/{k}": v for k, v in memory_gib().items()})
        mfu = f" | mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
        self.telemetry.info(
            f"step {step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e} | "
            f"gnorm {metrics['train/grad_norm']:.3f} | {metrics['perf/tokens_per_s']:,.0f} tok/s"
            + mfu)

    def _validate(self, step: int) -> dict[str, float]:
        val = self.evaluate()
        self.telemetry.info(f"step {step} | val loss {val:.4f}")
        return {"val/loss": val, "val/ppl": math.exp(min(val, 50))}

    def _finished(self) -> bool:
        end = self.cfg.train.max_steps
        if self.pmp is not None:
            end = self.pmp.end_step(end)
        return end is not None and self.state.step >= end

