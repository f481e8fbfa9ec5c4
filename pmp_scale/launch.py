"""Starting the project's launcher from inside Python: the study's runs and the attacker's
shadow run are real multi-rank pre-training runs, each in its own launcher process."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A parent may host a W=1 group or an HF Trainer; inherited, these would make every child rank
# its own node to DeepSpeed and streaming. The launcher sets each rank's own.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT")


def free_port() -> int:
    """A local TCP port nobody listens on now (a single-process group, a launcher's master)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(omp_threads: str = "1") -> dict[str, str]:
    """This process's environment minus its rank variables, for a launcher child; on a machine
    without a GPU, DeepSpeed's CPU accelerator with `omp_threads` threads per rank."""
    import torch
    env = {k: v for k, v in os.environ.items()
           if k not in RANK_ENV and not k.startswith("ACCELERATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=omp_threads)
    return env


def pretrain_command(config, ranks: int, sets: list[str]) -> list[str]:
    """launchers/pretrain.py on `ranks` local ranks, resumed from its newest checkpoint if any."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(REPO / "launchers" / "pretrain.py"),
           "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd + ["--resume", "auto"]
