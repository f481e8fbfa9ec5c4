"""What the tests share: paths, the tiny run config, a tiny study, and the one way to run code
on W ranks.

Multi-rank code runs through the real DeepSpeed launcher (`launch`): scenarios in
tests/dist/scenarios.py (`run_scenarios`), the entry points in launchers/, and the two-node
test, which starts the same launcher command (`launcher_command`, `launcher_env`) inside network
namespaces. `run_distributed` is the light variant for plain gloo functions that need a
process group but no DeepSpeed engine: it starts in seconds, the launcher in tens of seconds.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
SCENARIOS = REPO / "tests" / "dist" / "scenarios.py"

# Variables the launcher sets per rank: a launched rank must never inherit this process's.
LAUNCHER_OWNED = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- runs and their results ---------------------------------------------------------------------
def tiny_run_config(run_dir, dataset: dict, /, **sections) -> dict:
    """The raw config of a tiny llama run on `dataset` (the `tiny_data` fixture). A dict
    section updates the default one key by key (`data=` too); anything else replaces it."""
    raw = {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"preset": "llama-tiny"},
        # a written shuffle_seed: runs the tests compare share their data order (a PMP run
        # given none draws a secret one)
        "data": {"path": dataset["data"], "tokenizer": dataset["tokenizer"], "shuffle_seed": 17},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6,
                  "log_every": 1, "eval_every": 1000, "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"every": 1000, "keep": 2},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def with_overrides(raw: dict, over: dict) -> dict:
    """`section__key=value` sets one key of a config section; `section=value` replaces it."""
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[section] = value
    return raw


def gathered(model) -> dict:
    """A ZeRO-3 model's full parameters on CPU (tiny test models only)."""
    import deepspeed
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().cpu().clone()
    return out


def full_masks(mask_dir) -> dict:
    """A private mask artifact unpacked to one bool tensor per parameter, in its shape."""
    from pmp_scale.mask import read_artifact, unpack_bits
    packed, meta = read_artifact(Path(mask_dir))
    return {name: unpack_bits(packed[name], meta["numel"][name]).reshape(meta["shapes"][name])
            for name in packed}


def load_result(out: Path, name: str):
    """What a scenario saved as `<name>.pt` (plain pickles of tensors and dicts)."""
    import torch
    return torch.load(Path(out) / f"{name}.pt", weights_only=False)


# --- studies --------------------------------------------------------------------------------------
PRETRAIN = {"run_dir": "unused", "seed": 3, "model": {"preset": "llama-tiny"},
            "data": {"path": "set-by-the-study", "tokenizer": "set-by-the-study"},
            "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4,
                      "log_every": 2, "eval_every": 4, "eval_batches": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "checkpoint": {"every": 2, "keep": 1}, "logging": {"tensorboard": False}}
FINETUNE = {"release": "set-by-the-study", "mode": "unauthorized",
            "task": {"name": "review_lm", "max_length": 32, "max_train_examples": 32,
                     "max_eval_examples": 8},
            "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 1,
                      "eval_batch_size": 8},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                      "weight_decay": 0.0}}


def write_study(root: Path, tiny: dict, **over) -> Path:
    """A tiny study YAML (+ its pre-training and fine-tuning configs) in `root` on the
    `tiny_data` fixture; `section__key=value` sets one key, `section=value` replaces it."""
    import yaml
    (root / "pre.yaml").write_text(yaml.safe_dump(PRETRAIN))
    (root / "ft.yaml").write_text(yaml.safe_dump(FINETUNE))
    study = {"title": "tiny", "out_dir": str(root / "out"),
             "data": {"path": tiny["data"], "tokenizer": tiny["tokenizer"]},
             "pretrain": {"config": "pre.yaml"},
             "variants": [{"mask_ratio": [0.5], "mask_source": ["random"],
                           "complement": ["project"]}],
             "pmp": {"mask_seed": 3, "project_every": 2},
             "finetune": {"config": "ft.yaml", "lrs": [1e-3], "steps": [1], "seeds": [0, 1],
                          "min_seeds": 2}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            study[section][leaf] = value
        else:
            study[section] = value
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


# --- the DeepSpeed launcher ---------------------------------------------------------------------
def launcher_env(extra: dict | None = None) -> dict:
    """This process's environment minus what the launcher sets per rank. In-process tests (HF
    Trainer, accelerate, the fine-tuner's W=1 group) leave rank and accelerate variables
    behind; LOCAL_WORLD_SIZE=1 would make each launched rank its own node to streaming."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in LAUNCHER_OWNED and not k.startswith("ACCELERATE_")}
    return {**inherited, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **(extra or {})}


def launcher_command(script: Path | str, args: list[str], *launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", *launcher_args,
            str(script), *args]


def _shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def launch(script: Path | str, args: list[str], world_size: int, cwd=None,
           timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` on `world_size` CPU ranks with the deepspeed launcher.

    DeepSpeed's CPU all-reduce leaves a 66 MiB /dev/shm file per rank per run; remove ours.
    """
    before = _shm_files()
    port = str(29500 + (os.getpid() % 1000))
    cmd = launcher_command(script, args, "--num_gpus", str(world_size), "--master_port", port)
    try:
        return subprocess.run(cmd, cwd=cwd or REPO, env=launcher_env(env), capture_output=True,
                              text=True, timeout=timeout)
    finally:
        for f in _shm_files() - before:
            try:
                os.unlink(f)
            except OSError:
                pass


def launch_scenarios(out: Path, data: dict, names: list[str], world_size: int,
                     fault: str | None = None) -> subprocess.CompletedProcess:
    """One launch running `names` (tests/dist/scenarios.py) in order; it may fail (fault tests).
    `fault`: a FaultPlan spec handed to the fault scenarios' trainers."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return launch(SCENARIOS, ["--out", str(out), "--data", data["data"],
                              "--tokenizer", data["tokenizer"], "--scenarios", ",".join(names),
                              *(["--fault", fault] if fault else [])], world_size)


def run_scenarios(out: Path, data: dict, names: list[str], world_size: int) -> Path:
    """One launch that must succeed; returns `out`, where the scenarios wrote their results."""
    proc = launch_scenarios(out, data, names, world_size)
    if proc.returncode != 0:
        raise RuntimeError(f"scenarios {names} failed at world size {world_size}:\n"
                           f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return out


# --- plain gloo functions -----------------------------------------------------------------------
def _worker(rank, fn, world_size, port, out_dir, args):
    import torch
    import torch.distributed as dist
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
    A failure on any rank raises in the caller with that rank's traceback. Spawned processes
    cost seconds each, so a test should batch many cases into one call.
    """
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world_size)]
