"""One optimizer step on the ZeRO-3 engine, with the step hooks and non-finite skipping.

PMP plugs in here: after the last micro-batch's backward (gradients are reduced into each
rank's partition) and before `engine.step()`, every `StepHook` sees the partitioned gradients;
see `pmp_scale/mask/update.py`. A non-finite loss or gradient on any rank takes DeepSpeed's own
overflow path on every rank: no optimizer step, no moment update, no LR step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.distributed as dist

from ..ds_internals import grad_buffer, skip_step


class StepHook(Protocol):
    """Runs on every rank at each optimizer step, around `engine.step()`."""

    def before_step(self, engine, step: int) -> None: ...
    def after_step(self, engine, step: int) -> None: ...


class SkippedSteps:
    """Steps skipped for a non-finite loss or gradient: in all, and in a row up to now."""

    def __init__(self):
        self.skipped = 0
        self.bad_streak = 0


def optimizer_step(engine, losses: Iterable[torch.Tensor], hooks: list[StepHook], step: int,
                   counts: SkippedSteps, *, check_finite: bool = True,
                   loss_dtype: torch.dtype = torch.float32,
                   after_backward: Callable[[], None] | None = None) -> float:
    """One step over the micro-batch `losses` (computed lazily: one forward, one backward, then
    the next); returns their mean over micro-batches and ranks, summed in `loss_dtype`.
    `check_finite=False` leaves the skip decision to fp16's own loss scaler."""
    accum = engine.gradient_accumulation_steps()
    total = torch.zeros((), dtype=loss_dtype, device=engine.device)
    finite = True
    for micro, loss in enumerate(losses, start=1):
        engine.backward(loss)
        total += loss.detach().to(loss_dtype)
        if micro == accum:
            if after_backward is not None:
                after_backward()
            finite = not check_finite or _all_finite(engine, total)
            if finite:
                for hook in hooks:
                    hook.before_step(engine, step)
            else:  # DeepSpeed's own overflow path: no optimizer step, no moment update
                skip_step(engine, True)
        engine.step()
    if finite:
        counts.bad_streak = 0
        for hook in hooks:
            hook.after_step(engine, step)
    else:
        skip_step(engine, False)
        counts.skipped += 1
        counts.bad_streak += 1
    return mean_over_ranks(total / accum, engine.device)


def _all_finite(engine, loss: torch.Tensor) -> bool:
    """Loss and this rank's gradient partition finite, on every rank."""
    grads = grad_buffer(engine)
    ok = torch.isfinite(loss).to(grads.device) & torch.isfinite(grads).all()
    flag = ok.to(device=engine.device, dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(value: torch.Tensor, device) -> float:
    value = value.detach().to(device)
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()
