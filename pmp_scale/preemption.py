"""Graceful preemption: SIGTERM/SIGINT on any rank -> all ranks finish the current step, write a
checkpoint and exit 0. A watchdog ends the process if that takes longer than the grace period
(a scheduler's hard kill would otherwise land mid-write; the atomic checkpoint survives it).
"""
from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._flag = False
        self._timer: threading.Timer | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        """Repeats are ignored: the DeepSpeed launcher forwards SIGTERM to every rank, so a
        scheduler that signals the whole process group reaches each rank twice. Only the grace
        timer cuts the checkpoint short."""
        if self._flag:
            return
        self._flag = True
        self._timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        self._timer.daemon = True
        self._timer.start()

    def requested(self) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step)."""
        from deepspeed.accelerator import get_accelerator
        flag = torch.tensor([int(self._flag)], device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """The checkpoint is written (or training ended): the watchdog must not fire later."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
