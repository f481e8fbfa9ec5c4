"""Fine-tune a released model in one of three modes, on the DeepSpeed ZeRO-3 engine.

    unauthorized       every parameter trains (what anyone holding the release can do)
    unauthorized-lora  PEFT LoRA on the attention/MLP projections; only adapters + new head train
    head-only          only the output head trains (lm_head or the new classification head): the
                       baseline that says how much of a gain the body (backbone) contributed
    authorized         updates restricted to the private mask M with the pre-training hooks
                       (`MaskedUpdate`): the complement stays bit-exactly at the release; new
                       parameters (a classification head) are fully trainable

Always the same ZeRO-3 core as pre-training (`pmp_scale/zero3`): W=1 in-process (tests, sweeps;
`ensure_process_group`) or W>1 under the `deepspeed` launcher. The release is loaded the Hugging
Face way under ZeRO-3 (`HfDeepSpeedConfig` before `from_pretrained`: built under zero.Init,
weights loaded into the partitions) and checked against the release bit for bit, partition by
partition (`release_check.py`).
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, OptimConfig
from ..ds_internals import full_numel
from ..policies import Divergence
from ..telemetry import Telemetry
from ..zero3 import (DTYPES, SkippedSteps, build_ds_config, build_engine, ensure_process_group,
                     hf_zero3, init_partitioned, no_hf_init, optimizer_step,
                     require_local_rank, resolve_precision, warmup_decay)
from .config import FinetuneConfig
from .release_check import (Release, ReleaseLoadError, backbone_name, check_mask,
                            compare_with_release, sharded_mask, verify_loaded)
from .tasks import TaskData, build_task, classification_metrics, load_hf_tokenizer

log = logging.getLogger("pmp_scale.finetune")

LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


# --- model ----------------------------------------------------------------------------------------
def _init_new_params(model, release: Release, seed: int) -> None:
    """HF init, from `seed`, of the parameters the release does not have (a new classification
    head): under ZeRO-3, `from_pretrained` leaves them uninitialised (zeros or garbage)."""
    # A tied parameter (GPT-2's lm_head.weight is wte.weight) is released under its other
    # name only: it is loaded, not new — initialising it would overwrite the embedding.
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
              if n in release.shapes}
    new = set()
    for prefix, module in model.named_modules():
        direct = [f"{prefix}.{n}" if prefix else n
                  for n, p in module.named_parameters(recurse=False)
                  if id(p) not in loaded or (f"{prefix}.{n}" if prefix else n) in release.shapes]
        fresh = [n for n in direct if n not in release.shapes]
        if fresh and len(fresh) != len(direct):
            raise ReleaseLoadError(f"module {prefix!r} mixes released and new parameters "
                                   f"({fresh}); cannot initialise the new ones alone")
        new.update(fresh)
    if new:
        init_partitioned(model, seed, only=new)


def load_release_model(cfg: FinetuneConfig, task: TaskData, release: Release, ds_config: dict,
                       dtype: torch.dtype):
    """The release as a causal LM or a sequence classifier (new head), partitioned; with
    `cfg.reinit`, a fresh seeded init of its architecture instead."""
    import deepspeed
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification)
    kwargs = {}
    if task.kind == "lm":
        cls = AutoModelForCausalLM
    else:
        cls = AutoModelForSequenceClassification
        kwargs = dict(num_labels=task.num_labels, pad_token_id=task.pad_id)
    with hf_zero3(ds_config):
        if cfg.reinit:
            config = AutoConfig.from_pretrained(release.path, local_files_only=True, **kwargs)
            # HF's own init would run on the already-partitioned (empty) tensors and index the
            # embedding's padding row (classification configs set pad_token_id): skip it there
            # and initialise module by module on gathered parameters instead.
            with deepspeed.zero.Init(config_dict_or_path=ds_config), no_hf_init():
                model = cls.from_config(config, dtype=dtype)
            init_partitioned(model, cfg.seed)
        else:
            try:
                model = cls.from_pretrained(release.path, local_files_only=True, dtype=dtype,
                                            **kwargs)
            except (OSError, ValueError) as err:
                raise ReleaseLoadError(f"cannot load {release.path} as "
                                       f"{cls.__name__}: {err}") from err
            _init_new_params(model, release, cfg.seed)
    model.config.use_cache = False
    return model


def apply_lora(model, cfg: FinetuneConfig, release: Release):
    """LoRA adapters on the projections; the backbone freezes, new heads stay trainable."""
    from peft import LoraConfig, get_peft_model
    model_type = model.config.model_type
    targets = cfg.lora.target_modules
    if targets == "auto":
        if model_type not in LORA_TARGETS:
            raise ConfigError(f"lora.target_modules: no default for model type {model_type!r}; "
                             "list the module names")
        targets = LORA_TARGETS[model_type]
    new = [n for n, _ in model.named_parameters() if n not in release.shapes]
    peft_cfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(targets), fan_in_fan_out=model_type == "gpt2",
                          bias="none")
    torch.manual_seed(cfg.seed + 1)
    model = get_peft_model(model, peft_cfg)
    for name, p in model.named_parameters():
        if backbone_name(name) in new:
            p.requires_grad_(True)
    return model


def freeze_body(model, release: Release) -> None:
    """head-only: every released parameter but lm_head stops training; new ones (a
    classification head) train. (GPT-2 ties lm_head to the embedding: that trains too.)"""
    for name, p in model.named_parameters():
        p.requires_grad_(name not in release.shapes or name.startswith("lm_head."))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("mode head-only: the model has no lm_head and no new head to train")


# --- schedule -------------------------------------------------------------------------------------
def lr_factor(o: OptimConfig, total: int):
    """Linear warm-up, then constant / cosine / linear decay to min_lr_ratio at `total`."""
    return warmup_decay(o.warmup_steps, total, o.min_lr_ratio, o.schedule)


# --- data order -----------------------------------------------------------------------------------
class SampleOrder:
    """Seeded shuffle, a fresh permutation per epoch; position p of the stream -> example index."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return perm[i]


# --- the run --------------------------------------------------------------------------------------
class Finetuner:
    """One fine-tuning run; `run()` is the only loop."""

    def __init__(self, cfg: FinetuneConfig, task: TaskData | None = None,
                 release: Release | None = None):
        self.cfg = cfg
        self.release = release or Release.open(cfg.release)
        self.masks = self.mask_meta = None
        if cfg.mask is not None:
            self.masks, self.mask_meta = check_mask(cfg.mask, self.release,
                                                    cfg.allow_unbound_mask)
        self.task = task or build_task(cfg.task, load_hf_tokenizer(self.release.path))
        require_local_rank()  # before any process-group work
        ensure_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.grad_accum = cfg.grad_accum_steps(self.world)
        self.precision = resolve_precision(cfg.train.precision)
        self.ds_config = build_ds_config(cfg, self.world, self.precision)
        self.model = load_release_model(cfg, self.task, self.release, self.ds_config,
                                        DTYPES[self.precision])
        if cfg.verify_load and not cfg.reinit:
            verify_loaded(self.model, self.release)
        if cfg.mode == "unauthorized-lora":
            self.model = apply_lora(self.model, cfg, self.release)
        if cfg.mode == "head-only":
            freeze_body(self.model, self.release)
        self.schedule = lr_factor(cfg.optim, cfg.train.max_steps)
        self.engine = build_engine(self.model, cfg.optim, self.ds_config, self.schedule)
        self.hooks = []
        self.skips = SkippedSteps()
        if cfg.mode == "authorized":
            from ..mask.update import MaskedUpdate
            self.hooks.append(MaskedUpdate(self.engine, sharded_mask(self.engine, self.masks)))
        self.params = self._count_params()
        # metrics.jsonl beside result.json (none for a sweep's cells); log lines as pre-training's
        self.telemetry = Telemetry(cfg.out_dir, self.rank, tensorboard=False, logger=log)

    def _count_params(self) -> dict:
        total = trainable = 0
        for name, p in self.model.named_parameters():
            n = full_numel(p)
            total += n
            trainable += n if p.requires_grad else 0
        out = {"total": total, "trainable": trainable}
        if self.masks is not None and self.cfg.mode == "authorized":
            selected = sum(int(self.mask_meta["selected"][n]) for n in self.mask_meta["selected"]
                           if n in {backbone_name(m) for m, _ in self.model.named_parameters()})
            new = sum(full_numel(p) for n, p in self.model.named_parameters()
                      if backbone_name(n) not in self.release.shapes)
            out["updatable"] = selected + new
        return out

    # --- evaluation -------------------------------------------------------------------------------
    def _forward(self, batch: dict) -> object:
        return self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()})

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss (and classification metrics) over the whole split; batches round-robin over
        ranks (every rank runs the same number of forwards, as ZeRO-3 gathers need)."""
        task, bs = self.task, self.cfg.train.eval_batch_size
        n = task.size(split)
        n_batches = -(-n // bs)
        rounds = -(-n_batches // self.world)
        k = task.num_labels or 1
        sums = torch.zeros(2 + k * k, dtype=torch.float64)  # loss·weight, weight, confusion
        self.engine.eval()
        for r in range(rounds):
            b = r * self.world + self.rank
            real = b < n_batches
            idx = range(b * bs, min(n, (b + 1) * bs)) if real else range(min(n, bs))
            batch = task.collate(split, idx)
            out = self._forward(batch)
            if not real:
                continue
            weight = len(idx) * (task.max_length - 1 if task.kind == "lm" else 1)
            sums[0] += out.loss.double().item() * weight
            sums[1] += weight
            if task.kind == "classification":
                pred = out.logits.argmax(-1).cpu()
                sums[2:] += torch.bincount(batch["labels"] * k + pred, minlength=k * k).double()
        self.engine.train()
        sums = sums.to(self.engine.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        loss = (sums[0] / sums[1]).item()
        metrics = {"loss": loss}
        if task.kind == "lm":
            metrics["ppl"] = math.exp(min(loss, 50.0))
        else:
            metrics.update(classification_metrics(sums[2:].view(k, k)))
        return metrics

    # --- training ---------------------------------------------------------------------------------
    def _micro_batches(self, order: SampleOrder, step: int):
        mb, G = self.cfg.train.micro_batch_size, self.cfg.train.global_batch_size
        for m in range(self.grad_accum):
            start = step * G + (m * self.world + self.rank) * mb
            yield self.task.collate("train", [order[p] for p in range(start, start + mb)])

    def train_step(self, order: SampleOrder, step: int) -> float:
        """One optimizer step (the shared ZeRO-3 step: hooks, non-finite skipping)."""
        losses = (self._forward(batch).loss for batch in self._micro_batches(order, step))
        return optimizer_step(self.engine, losses, self.hooks, step, self.skips,
                              loss_dtype=torch.float64)

    def run(self, progress=None) -> dict:
        """Train max_steps; validation at 0 / eval_every / eval_steps / end, test at 0,
        eval_steps and the end. `progress(step)` is called after every step (sweeps' progress bars)."""
        c = self.cfg
        t0 = time.perf_counter()
        total = c.train.max_steps
        full = sorted({s for s in c.train.eval_steps if 0 < s <= total} | {total})
        curve_at = set(full) | ({s for s in range(c.train.eval_every, total + 1, c.train.eval_every)}
                                if c.train.eval_every else set())
        result = {"mode": c.mode, "release": str(self.release.path), "seed": c.seed,
                  "lr": c.optim.lr, "max_steps": total, "task": self.task.name,
                  "metric": self.task.metric, "higher_is_better": self.task.higher_is_better,
                  "world_size": self.world, "precision": self.precision, "params": self.params,
                  "reinit": c.reinit, "train_loss": [], "curve": [], "at": {}, "diverged": False}
        if c.train.eval_at_start:  # the release itself (with a fresh head): validation + test
            base, base_test = self.evaluate("validation"), self.evaluate("test")
            result["curve"].append({"step": 0, **base})
            result["at"]["0"] = {"validation": base, "test": base_test}
            self.telemetry.scalars(0, _prefixed(base, "val") | _prefixed(base_test, "test"))
            self.telemetry.info(f"{c.mode} | step 0 | val {_fmt(base)} | test {_fmt(base_test)}")
        order = SampleOrder(self.task.size("train"), c.seed)
        divergence = Divergence(c.train.nonfinite_max_in_a_row, self.telemetry)
        steps_done = 0
        for step in range(total):
            loss = self.train_step(order, step)
            steps_done = step + 1
            result["train_loss"].append([steps_done, loss])
            if progress is not None:
                progress(steps_done)
            metrics = {"train/loss": loss, "lr": self.engine.get_lr()[0]}
            if divergence.check(steps_done, self.skips.bad_streak):
                self.telemetry.scalars(steps_done, metrics)
                result["diverged"] = True
                break
            if steps_done % c.train.log_every == 0:
                self.telemetry.info(f"{c.mode} | step {steps_done} | loss {loss:.4f} | "
                                    f"lr {metrics['lr']:.2e}")
            if steps_done in curve_at:
                val = self.evaluate("validation")
                metrics |= _prefixed(val, "val")
                result["curve"].append({"step": steps_done, **val})
                if steps_done in full:
                    test = self.evaluate("test")
                    metrics |= _prefixed(test, "test")
                    result["at"][str(steps_done)] = {"validation": val, "test": test}
                    self.telemetry.info(f"{c.mode} | step {steps_done} | val {_fmt(val)} | "
                                        f"test {_fmt(test)}")
            self.telemetry.scalars(steps_done, metrics)
        if result["diverged"]:
            nan = {"loss": float("nan"), **({"ppl": float("nan")} if self.task.kind == "lm" else
                                           {"accuracy": float("nan"), "f1": float("nan"),
                                            "matthews": float("nan")})}
            for s in full:
                result["at"].setdefault(str(s), {"validation": nan, "test": nan})
        result["final"] = result["at"][str(total)]
        if self.masks is not None or c.mode in ("unauthorized-lora", "head-only"):
            result["backbone"] = compare_with_release(self.model, self.release, self.masks)
        result["steps_done"] = steps_done
        result["skipped_steps"] = self.skips.skipped
        result["time_s"] = time.perf_counter() - t0
        return result

    # --- export -----------------------------------------------------------------------------------
    def export(self, out_dir) -> dict:
        """Write the fine-tuned model as a standard HF directory through the release path: an
        engine checkpoint beside `out_dir` (all ranks; a filesystem they share), the source
        release's description files as its `hf/`, then `release.release_checkpoint` (lazy fp32
        rebuild, audited safetensors, atomic) on rank 0; the checkpoint is removed after.
        Written in the training precision, so the weights are exactly the fine-tuned ones."""
        from ..release import INDEX_FILE, release_checkpoint
        out_dir = Path(out_dir)
        work = out_dir.parent / f".{out_dir.name}.zero3"
        if self.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        dist.barrier()
        self.engine.save_checkpoint(str(work), tag="final", save_latest=False)
        dist.barrier()
        outcome = [None]
        if self.rank == 0:
            try:
                hf = work / "final" / "hf"
                hf.mkdir()
                for f in self.release.path.iterdir():  # generation config, tokenizer
                    if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                            INDEX_FILE, "config.json"):
                        shutil.copyfile(f, hf / f.name)
                # the fine-tuned model's own config: a classifier's head, labels and padding
                config = copy.deepcopy(self.model.config)
                config.architectures = [type(self.model).__name__]
                config.use_cache = True  # off for training only
                config.save_pretrained(hf)
                sha = release_checkpoint(work / "final", out_dir, dtype=self.precision,
                                         overwrite=self.cfg.export.overwrite, progress=False)
                outcome[0] = {"dir": str(out_dir), "sha256": sha, "dtype": self.precision}
            except Exception as err:  # every rank leaves together, with rank 0's error
                outcome[0] = err
            finally:
                shutil.rmtree(work, ignore_errors=True)
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        self.telemetry.info(f"{self.cfg.mode} | exported to {out_dir} "
                            f"(sha256 {outcome[0]['sha256'][:16]}…)")
        return outcome[0]

    def close(self) -> None:
        for hook in self.hooks:
            if hasattr(hook, "remove"):
                hook.remove()
        self.engine.destroy()
        self.engine = self.model = None
        self.telemetry.close()
        gc.collect()


def _prefixed(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _refuse_export_over(path: Path, overwrite: bool) -> None:
    """Before training: a non-empty export directory would only be refused at the end."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ConfigError(f"export.dir {path} is not empty; set export.overwrite=true to "
                          "replace it")


def finetune(cfg: FinetuneConfig, task: TaskData | None = None, release: Release | None = None,
             progress=None) -> dict:
    """One run, start to end; writes `<out_dir>/result.json` (rank 0) when out_dir is set, and
    the fine-tuned model to `export.dir` when set."""
    if cfg.export.dir is not None:
        _refuse_export_over(Path(cfg.export.dir), cfg.export.overwrite)
    ft = Finetuner(cfg, task, release)
    try:
        result = ft.run(progress)
        if cfg.export.dir is not None:
            result["export"] = ft.export(cfg.export.dir)
    finally:
        ft.close()
    result["config"] = cfg.model_dump(mode="json")
    if cfg.out_dir and dist.get_rank() == 0:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result
