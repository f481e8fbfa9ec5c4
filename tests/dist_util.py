"""Run a function on W gloo ranks from inside one pytest test.

Spawned processes cost seconds each, so tests should batch many cases into one call.
"""
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, out_dir, args):
    torch.set_num_threads(1)  # W processes share a few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on every rank; returns the per-rank results in rank order.

    fn must be a module-level function (it is pickled by name) and return torch.save-able data.
    A failure on any rank raises in the caller with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world_size)]
