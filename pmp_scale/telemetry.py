"""Rank-0 metrics: TensorBoard scalars, one concise log line, and metrics.jsonl for tools/tests."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil
import torch

log = logging.getLogger("pmp_scale")

# Dense bf16 peak TFLOP/s per device, used for MFU when logging.peak_tflops is not set.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0,
                "L40S": 362.0, "V100": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _PEAK_TFLOPS.items():
            if key in name:
                return value
    return None  # CPU: no meaningful peak, so no MFU unless configured


def memory_gib() -> dict[str, float]:
    out = {"rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["gpu_max_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class ThroughputWindow:
    """Tokens/s, seconds per step and MFU over the steps since the last `measure()`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int,
                 peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak = world_size, peak
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def measure(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        tps = self.tokens_per_step * self.steps / elapsed
        out = {"perf/tokens_per_s": tps, "perf/step_s": elapsed / self.steps}
        if self.peak:
            per_device = tps * self.flops_per_token / self.world_size
            out["perf/mfu"] = per_device / (self.peak * 1e12)
        self.start, self.steps = time.perf_counter(), 0
        return out


class Telemetry:
    """Writes only on rank 0; other ranks get a no-op object with the same interface.
    Pre-training and fine-tuning (`logger` pmp_scale.finetune) both log through it; with
    `run_dir` None it logs lines only and writes no file (fine-tuning sweeps' cells)."""

    def __init__(self, run_dir: str | Path | None, rank: int, tensorboard: bool = True,
                 logger: logging.Logger = log):
        self.enabled = rank == 0
        self.log = logger
        self.writer = None
        self.metrics_file = None
        if not self.enabled or run_dir is None:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
        if record and self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
