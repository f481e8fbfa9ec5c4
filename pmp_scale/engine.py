"""DeepSpeed ZeRO-3 pre-training: components, the train step, evaluation.

The train step is where PMP plugs in: after the last micro-batch's backward (gradients are
reduced into each rank's partition) and before `engine.step()`, every `StepHook` sees the
partitioned gradients; see `pmp_scale/mask/update.py`.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml

from .checkpoint import Checkpointer, RNGState, tag_for
from .cluster import check_shared_run_dir
from .preemption import Preemption
from .faults import fault_point
from .config import ConfigError, RunConfig
from .data import DataError, batches, build_loader, load_tokenizer, read_meta
from .models import build_hf_config, build_model, count_params, flops_per_token
from .telemetry import Telemetry, memory_gib, peak_tflops
from .zero3 import init_master


# PMP settings a checkpoint's mask and discovery state depend on: resuming with others would
# silently train a different method.
PMP_IDENTITY = {"mask_ratio", "mask_source", "score", "topk_scope", "exclude",
                "exclude_constant_init", "rewind", "complement"}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StepHook(Protocol):
    """Runs on every rank at each optimizer step, around `engine.step()`."""

    def before_step(self, engine, step: int) -> None: ...
    def after_step(self, engine, step: int) -> None: ...


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "fp32" if on_cpu() else "bf16"
    if precision == "fp16" and on_cpu():
        raise ConfigError("train.precision fp16 is not supported on CPU ranks; use fp32 or bf16")
    return precision


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config pmp_scale derives from the run config; `deepspeed:` overrides it."""
    derived = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": 3,
            # One fp32 sub-group is snapshotted by the PMP restore hook: keep them moderate.
            "sub_group_size": 100_000_000,
            "contiguous_gradients": True,
            "overlap_comm": not on_cpu(),
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(derived, cfg.deepspeed)


def offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def lr_lambda(cfg: RunConfig):
    """Linear warm-up then cosine decay to min_lr_ratio·lr at max_steps."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D tensors (norms, biases); ZeRO-3 shapes live in `ds_shape`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _set_cpu_threads() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def init_distributed() -> None:
    import deepspeed
    if not dist.is_initialized():
        if not on_cpu():  # NCCL collectives before the engine exists (the run_dir probe, the
            from deepspeed.accelerator import get_accelerator  # seed broadcast) use this device
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl")


class TrainState:
    """Counters that must survive a resume."""

    def __init__(self):
        self.step = 0
        self.tokens = 0
        self.skipped = 0      # steps skipped for a non-finite loss or gradient
        self.bad_streak = 0   # ... of which consecutive, up to now

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


class Trainer:
    """Owns every component of a run; `train()` is the only loop."""

    def __init__(self, cfg: RunConfig, hooks: list[StepHook] | None = None):
        # Everything that can be checked without a process group is checked first.
        self.cfg = cfg
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
        self.train_loader = build_loader(
            cfg.data.path, "train", cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
            seed=cfg.data.shuffle_seed, num_canonical_nodes=cfg.data.num_canonical_nodes,
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
                                     self._reset_schedule, self.telemetry,
                                     constant_init=self.constant_init)
            self.hooks.append(self.pmp)
            components["pmp"] = self.pmp
        self.checkpointer = Checkpointer(
            self.engine, self.run_dir / "checkpoints", cfg.checkpoint.keep,
            components=components,
            fingerprint={"preset": cfg.model.preset, "n_params": self.n_params,
                         "world_size": self.world_size, "seq_len": self.seq_len,
                         "pmp": cfg.pmp.enabled and cfg.pmp.model_dump(include=PMP_IDENTITY)},
            describe=self._describe_model)

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
        import deepspeed
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.model = build_model(self.hf_config, self.ds_config, dtype[self.precision])
        o = self.cfg.optim
        self.schedule = lr_lambda(self.cfg)
        groups = param_groups(self.model, o.weight_decay)
        if offloads_optimizer(self.ds_config):  # the step runs on the host: DeepSpeed's CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                                          fused=not on_cpu())
        engine, *_ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.schedule))
        self.constant_init = init_master(engine, seed)
        return engine

    def _reset_schedule(self) -> None:
        """Restart warm-up + cosine (PMP rewinds to θ(0) after Stage I: Stage II starts afresh)."""
        sched = self.engine.lr_scheduler
        sched.last_epoch = 0
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * self.schedule(0)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

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

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.engine.device)
        dist.all_reduce(value)
        return value.item() / self.world_size

    def train_step(self, batches) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        total = torch.zeros((), device=self.engine.device)
        finite = True
        for micro in range(self.grad_accum):
            loss = self._forward(next(batches))
            self.engine.backward(loss)
            total += loss.detach().float()
            if micro == self.grad_accum - 1:
                fault_point(f"backward:{self.state.step + 1}")
                finite = self._all_finite(total)
                if finite:
                    for hook in self.hooks:
                        hook.before_step(self.engine, self.state.step)
                else:  # DeepSpeed's own overflow path: no optimizer step, no moment update
                    self.engine.optimizer.overflow = True
            self.engine.step()
        if finite:
            self.state.bad_streak = 0
            for hook in self.hooks:
                hook.after_step(self.engine, self.state.step)
        else:
            self.engine.optimizer.overflow = False
            self.state.skipped += 1
            self.state.bad_streak += 1
        return self._mean_over_ranks(total / self.grad_accum)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Loss and this rank's gradient partition finite on every rank (fp16 has its own)."""
        if self.precision == "fp16":
            return True
        grads = self.engine.optimizer.grad_partitions_flat_buffer
        ok = torch.isfinite(loss) & torch.isfinite(grads).all()
        flag = ok.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total = torch.zeros((), device=self.engine.device)
        for batch in self.val_batches:
            total += self._forward(batch).float()
        self.engine.train()
        return self._mean_over_ranks(total / len(self.val_batches))

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
            val = self.evaluate()
            self.telemetry.scalars(0, {"val/loss": val, "val/ppl": math.exp(min(val, 50))})
            self.telemetry.info(f"step 0 | val loss {val:.4f}")
        tokens_per_step = c.train.global_batch_size * self.seq_len
        batches = self._batches()
        preemption = Preemption(c.checkpoint.preempt_grace_s)
        try:
            return self._loop(batches, tokens_per_step, preemption, stop_at)
        finally:
            preemption.close()
            self.telemetry.close()

    def _loop(self, batches, tokens_per_step, preemption, stop_at) -> dict[str, float]:
        c = self.cfg
        last = {}
        window_start, window_steps = time.perf_counter(), 0
        while not self._finished():
            loss = self.train_step(batches)
            self.state.step += 1
            self.state.tokens += tokens_per_step
            window_steps += 1
            step = self.state.step
            fault_point(f"step:{step}")
            metrics = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                       "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                       "train/skipped_steps": self.state.skipped}
            if self.pmp is not None:
                metrics["pmp/stage"] = self.pmp.stage
            last_step = self._finished()
            if step % c.train.log_every == 0 or last_step:
                elapsed = time.perf_counter() - window_start
                tps = tokens_per_step * window_steps / elapsed
                metrics["perf/tokens_per_s"] = tps
                metrics["perf/step_s"] = elapsed / window_steps
                if self.peak_tflops:
                    per_device = tps * self.flops_per_token / self.world_size
                    metrics["perf/mfu"] = per_device / (self.peak_tflops * 1e12)
                metrics.update({f"mem/{k}": v for k, v in memory_gib().items()})
                self.telemetry.info(
                    f"step {step} | loss {loss:.4f} | lr {metrics['train/lr']:.2e} | "
                    f"gnorm {metrics['train/grad_norm']:.3f} | {tps:,.0f} tok/s"
                    + (f" | mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""))
                window_start, window_steps = time.perf_counter(), 0
            if step % c.train.eval_every == 0 or last_step:
                val = self.evaluate()
                metrics.update({"val/loss": val, "val/ppl": math.exp(min(val, 50))})
                self.telemetry.info(f"step {step} | val loss {val:.4f}")
            self.telemetry.scalars(step, metrics)
            last = metrics
            if self.state.bad_streak:
                self.telemetry.info(f"step {step} skipped: non-finite loss or gradient "
                                    f"({self.state.bad_streak} in a row)")
            diverged = self.state.bad_streak >= c.train.nonfinite_max_in_a_row
            preempted = preemption.requested()
            if (step % c.checkpoint.every == 0 or last_step or step == stop_at
                    or diverged or preempted):
                self.checkpointer.save(step)
            if diverged:
                raise NonFiniteError(
                    f"training stopped: non-finite loss or gradient in {self.state.bad_streak} "
                    f"consecutive steps up to step {step}; the checkpoint {tag_for(step)} holds "
                    "the last good weights (skipped steps change nothing); lower optim.lr or "
                    "inspect the data, then --resume auto")
            if preempted:
                self.telemetry.info(f"preempted: checkpoint {tag_for(step)} written, exiting")
                return last
            if step == stop_at:
                return last
        if self.pmp is not None:
            path = self.pmp.write_private()
            self.telemetry.info(f"pmp private artifacts written to {path} (keep them secret)")
        return last

    def _finished(self) -> bool:
        end = self.cfg.train.max_steps
        if self.pmp is not None:
            end = self.pmp.end_step(end)
        return end is not None and self.state.step >= end


__all__ = ["Trainer", "StepHook", "NonFiniteError", "build_ds_config"]
