"""The shared-filesystem contract of a multi-node run, checked before anything is trained.

Every rank writes its checkpoint files into `run_dir`; rank 0 hashes the list of all ranks'
files into the completion marker, and a resume reads every rank's files back. So `run_dir` must
be one directory that every rank sees (NFS, Lustre, a parallel filesystem). Without the check a
node-local `run_dir` trains for hours and then fails at the first checkpoint, or worse, writes a
tag no node can resume from. Node-local paths are fine where they are meant to be per node:
`data.local_cache`, TMPDIR, /dev/shm.
"""
from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import torch.distributed as dist

from .errors import UserError

PROBE_DIR = ".shared_fs_probe"


class SharedFilesystemError(UserError, RuntimeError):
    """run_dir is not one directory shared by every rank."""


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def check_shared_run_dir(run_dir: str | Path, wait_s: float = 5.0) -> None:
    """Every rank writes a probe file under `run_dir`; rank 0 must see all of them.

    Raises `SharedFilesystemError` on every rank alike (none is left waiting in a collective)
    naming the directory and the ranks rank 0 cannot see. `wait_s` covers attribute caching
    of network filesystems. The probe's name is fresh per launch: leftovers never count."""
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = Path(run_dir) / PROBE_DIR / token[0]
    mine = probe / f"rank{rank}"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        mine.write_text(socket.gethostname())
        problem = None
    except OSError as err:
        problem = f"{err.strerror or err}"
    hosts: list = [None] * world
    dist.all_gather_object(hosts, (socket.gethostname(), problem))  # also: all have written
    verdict = [None]
    if rank == 0:
        unwritable = [r for r, (_, why) in enumerate(hosts) if why]
        deadline = time.monotonic() + wait_s
        while True:
            unseen = [r for r in range(world)
                      if r not in unwritable and not (probe / f"rank{r}").is_file()]
            if not unseen or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if unwritable:
            verdict[0] = (f"run_dir {run_dir} is not writable by every rank: " + "; ".join(
                f"rank {r} ({hosts[r][0]}): {hosts[r][1]}" for r in unwritable))
        elif unseen:
            where = sorted({hosts[r][0] for r in unseen})
            verdict[0] = (
                f"run_dir {run_dir} is not shared by all ranks: rank 0 cannot see the probe "
                f"files of {_ranks(unseen)} (host {', '.join(where)}); put run_dir on a "
                "filesystem every node mounts at the same path (node-local paths such as "
                "data.local_cache may differ per node)")
    dist.broadcast_object_list(verdict, src=0)
    for path in (mine, probe, probe.parent):  # the last rank out removes the directories
        try:
            path.unlink() if path == mine else path.rmdir()
        except OSError:
            pass
    if verdict[0]:
        raise SharedFilesystemError(verdict[0])


__all__ = ["check_shared_run_dir", "SharedFilesystemError", "PROBE_DIR"]
