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
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._flag:  # a second signal: stop waiting
            os._exit(128 + signum)
        self._flag = True
        timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    def requested(self) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step)."""
        from deepspeed.accelerator import get_accelerator
        flag = torch.tensor([int(self._flag)], device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
