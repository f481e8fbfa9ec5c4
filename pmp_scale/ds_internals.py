"""Every touch of DeepSpeed's and mosaicml-streaming's internals, in one room.

pmp_scale depends on things neither library documents as API: ZeRO-3 optimizer attributes, the
checkpoint's file names, a configuration flag, and wrapped methods. Each one is named here,
once, so an upgrade has one file to check. `CHECKED_VERSIONS` are the versions these were read
against, `RELIED_ON` lists every name used; tests/test_ds_internals.py fails, naming it, when an
installed version differs or a name is gone. Nothing outside this module reaches into either
library's private names.

The patches, each undone or idempotent: (1) `write_failures_recorded` wraps DeepSpeed's
checkpoint writes during a save; (2) `record_shard_failures` wraps streaming's `prepare_shard`
and its epoch threads; (3) `check_on_first_read` hooks a shard's first read; (4)
`hide_build_notices` mutes a print;
(5) `launcher_local_world_size` answers streaming's local world size while a dataset is built.

Imports of deepspeed/streaming stay inside the functions: importing this module (the CLI, the
data loader) imports neither library.
"""
from __future__ import annotations

import contextlib
import os
import re
from argparse import Namespace
from pathlib import Path
from typing import Callable

import torch

CHECKED_VERSIONS = {"deepspeed": "0.19.7", "mosaicml-streaming": "0.13.0"}

# "module" or "module:Class" -> names used from it (attributes, methods, or instance attributes
# the class assigns; "param.X": what ZeRO-3 assigns to every partitioned parameter).
RELIED_ON = {
    "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3": [
        "fp32_partitioned_groups_flat", "fp16_groups", "grad_partitions_flat_buffer",
        "optimizer", "backup_optimizer", "offload_optimizer", "overflow", "get_param_id",
        "norm_for_param_grads", "grad_position", "_constant_buffered_norm2",
        "_reassign_or_swap_out_partitioned_parameters", "_partition_all_parameters",
        "persistent_parameters"],
    "deepspeed.runtime.zero.partition_parameters": [
        "param.ds_id", "param.ds_shape", "param.ds_numel", "param.ds_tensor",
        "param.partition_numel", "param.all_gather"],
    "deepspeed.runtime.engine:DeepSpeedEngine": [
        "checkpoint_engine", "_copy_recovery_script", "_config", "save_checkpoint",
        "load_checkpoint"],
    "deepspeed.runtime.config:DeepSpeedConfig": ["load_universal_checkpoint"],
    "deepspeed.checkpoint.ds_to_universal": ["main"],
    "deepspeed.utils.zero_to_fp32": ["get_fp32_state_dict_from_zero_checkpoint",
                                     "GatheredTensor"],
    "deepspeed.utils.zero_to_fp32:GatheredTensor": ["flat_groups"],
    "deepspeed.comm.torch": ["build_shm_op"],
    "deepspeed.utils": ["logger"],
    "streaming.base.dataset:StreamingDataset": [
        "streams", "shards", "stream_per_shard", "_shard_states", "_event", "_prepare_thread",
        "_ready_thread", "_each_sample_id", "_filelock_root", "_shm_prefix_int"],
    "streaming.base.constant": ["BARRIER_FILELOCK", "CACHE_FILELOCK"],
    "streaming.base.dataset:_Iterator": ["on_exit"],
    "streaming.base.dataset:_ShardState": ["REMOTE"],
    "streaming.base.stream:Stream": [
        "prepare_shard", "_download_file", "_decompress_shard_part", "remote", "split"],
    "streaming.base.format.base.reader:Reader": [
        "get_sample_data", "file_pairs", "dirname", "split", "compression"],
    "streaming.base.util": ["clean_stale_shared_memory"],
    "streaming.base.distributed": ["get_local_world_size"],
    # Imported by the modules that use them (tests/test_ds_internals.py checks every import of
    # either library against this table): public entry points and a few deeper helpers.
    "deepspeed.accelerator": ["get_accelerator"],
    "deepspeed.ops.adam": ["DeepSpeedCPUAdam"],
    "streaming": ["StreamingDataset", "StreamingDataLoader", "MDSWriter"],
    "streaming.base.storage": ["CloudDownloader"],
    "streaming.base.hashing": ["get_hash"],
    "streaming.base.compression": ["decompress"],
    "streaming.base.format": ["reader_from_json"],
}

# --- checkpoint layout: DeepSpeed's file names, our client-state key ------------------------------
LATEST = "latest"                # DeepSpeed's pointer file to the newest tag
CLIENT_STATE_KEY = "pmp_components"  # our per-rank components inside DeepSpeed's model states
MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
# DeepSpeed prefixes the optimizer files of bf16 runs with `bf16_` (engine._get_zero_ckpt_prefix)
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
RANK_FILES = ("zero_pp_rank_R_mp_rank_00_model_states.pt and "  # the two above, for messages
              "[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt")
RANK_FILE = re.compile(r"(?:^|_)rank_(\d+)_")  # any per-rank file of a tag (model or optimizer)


def model_states_file(rank: int) -> str:
    """Name of rank `rank`'s model-states file (it carries the rank's client state)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def file_rank(name: str) -> int | None:
    """The DeepSpeed rank that wrote per-rank file `name` (None: a shared file)."""
    m = RANK_FILE.search(name)
    return int(m.group(1)) if m else None


def client_components(states: dict) -> dict:
    """Our components' states out of a rank's loaded model states / client state."""
    return states.get(CLIENT_STATE_KEY, {})


# --- ZeRO-3 parameters (attributes ZeRO-3 adds to every partitioned parameter) ------------------
def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param) -> tuple[int, ...]:
    """The parameter's real shape (a partitioned one is an empty placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())


def partition_numel(param) -> int:
    """P = ceil(numel / world): the padded length of every rank's partition."""
    return param.partition_numel()


def local_partition(param) -> torch.Tensor:
    """This rank's partition of the parameter, in the training dtype."""
    return param.ds_tensor


# --- the ZeRO-3 optimizer (DeepSpeedZeroOptimizer_Stage3) --------------------------------------------
def fp32_master(engine) -> list[torch.Tensor]:
    """This rank's fp32 master, one flat tensor per sub-group; the gradient buffer and the mask
    shard share its layout."""
    return engine.optimizer.fp32_partitioned_groups_flat


def sub_group_params(engine) -> list[list]:
    """The parameters of each sub-group, in the order their partitions are concatenated."""
    return engine.optimizer.fp16_groups


def grad_buffer(engine) -> torch.Tensor:
    """The partitioned gradients of all sub-groups, concatenated (valid at the boundary)."""
    return engine.optimizer.grad_partitions_flat_buffer


def inner_optimizers(engine) -> list[torch.optim.Optimizer]:
    """The torch optimizers that step the sub-groups: partial offload (`ratio` < 1) keeps some
    sub-groups on the device and steps them with a second one."""
    zero = engine.optimizer
    return [o for o in (zero.optimizer, getattr(zero, "backup_optimizer", None)) if o is not None]


def inner_param_groups(engine) -> list[dict]:
    return engine.optimizer.optimizer.param_groups


def offloads_optimizer(engine) -> bool:
    return bool(getattr(engine.optimizer, "offload_optimizer", False))


def step_skipped(engine) -> bool:
    """fp16 loss-scale overflow: DeepSpeed skipped the whole optimizer step."""
    return bool(getattr(engine.optimizer, "overflow", False))


def skip_step(engine, skip: bool) -> None:
    """Raise (or clear) DeepSpeed's overflow flag: its own path that skips the optimizer step
    and leaves the moments untouched, used for a non-finite loss or gradient."""
    engine.optimizer.overflow = skip


def reset_optimizer_state(engine) -> None:
    """Fresh Adam moments: the inner optimizer creates its state lazily on the next step."""
    engine.optimizer.optimizer.state.clear()


def renorm_offloaded_grads(engine, group: int, grad: torch.Tensor) -> None:
    """Offload caches each parameter's gradient norm at the boundary backward (used for the
    global norm and clipping): recompute those of sub-group `group` from the host gradients
    `grad` (after the caller changed them)."""
    zero = engine.optimizer
    for p in zero.fp16_groups[group]:
        pid = zero.get_param_id(p)
        if pid in zero.norm_for_param_grads:
            _, start, numel = zero.grad_position[pid]
            zero.norm_for_param_grads[pid] = zero._constant_buffered_norm2(
                grad.narrow(0, start, numel))


@torch.no_grad()
def master_to_params(engine) -> None:
    """Copy every fp32 master sub-group into the training partitions (and gathered copies)."""
    zero = engine.optimizer
    for g in range(len(zero.fp32_partitioned_groups_flat)):
        zero._reassign_or_swap_out_partitioned_parameters(g)  # fp32 master -> lp partition
    # Persistent (small) parameters stay gathered between steps and all_gather skips
    # gathered ones: release everything first, or they would keep their old values.
    zero._partition_all_parameters()
    if zero.persistent_parameters:
        zero.persistent_parameters[0].all_gather(zero.persistent_parameters)


def unshare_step_counts(engine) -> None:
    """Give every sub-group its own Adam `step` tensor (the universal loader shares one)."""
    zero = engine.optimizer
    state = zero.optimizer.state
    for flat in zero.fp32_partitioned_groups_flat:
        step = state.get(flat, {}).get("step")
        if torch.is_tensor(step):
            state[flat]["step"] = step.clone()


# --- offline reads of a ZeRO-3 checkpoint (releases) -------------------------------------------------
def lazy_flat_groups(lazy) -> list[list[torch.Tensor]]:
    """The per-rank fp32 flat partitions (memory-mapped) behind DeepSpeed's lazy ZeRO-3 state
    dict: every `GatheredTensor` of it holds the same `flat_groups`; [] when it holds none."""
    from deepspeed.utils.zero_to_fp32 import GatheredTensor
    return next((t.flat_groups for t in lazy.values() if isinstance(t, GatheredTensor)), [])


# --- universal checkpoints (elastic resume) ----------------------------------------------------------
def convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's `ds_to_universal`, called as its command line would (it takes argv-like args)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out_dir),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False))


@contextlib.contextmanager
def loading_universal(engine):
    """`engine.load_checkpoint` reads a universal checkpoint while this is open (DeepSpeed only
    offers the switch in its config, read at load time)."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


# --- patch 1: DeepSpeed's checkpoint writes -----------------------------------------------------------
@contextlib.contextmanager
def write_failures_recorded(engine, failed: list[BaseException]):
    """Inside DeepSpeed's save_checkpoint, record a failed write instead of raising it.

    save_checkpoint ends with a barrier: a rank that raised out of it would leave the others
    waiting there. torch.save reports a full disk as RuntimeError ("PytorchStreamWriter failed
    writing file", "unexpected pos ..."), not OSError, so both count. Once a write failed, this
    rank's remaining writes are skipped. Rank 0 also copies zero_to_fp32.py beside the tags.
    Patched for the duration: `checkpoint_engine.save` and `engine._copy_recovery_script`."""
    targets = [(engine.checkpoint_engine, "save"), (engine, "_copy_recovery_script")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]

    def recording(write):
        def wrapper(*args, **kwargs):
            if not failed:
                try:
                    write(*args, **kwargs)
                except (OSError, RuntimeError) as err:
                    failed.append(err)
        return wrapper

    for obj, name, write in originals:
        setattr(obj, name, recording(write))
    try:
        yield
    finally:
        for obj, name, write in originals:
            setattr(obj, name, write)


# --- mosaicml-streaming -----------------------------------------------------------------------------
@contextlib.contextmanager
def launcher_local_world_size():
    """Streaming takes ranks-per-machine from torchrun's LOCAL_WORLD_SIZE; the deepspeed
    launcher exports LOCAL_SIZE instead. Without it every rank on a machine is a local leader
    (FileExistsError on '/000000_locals'). Streaming asks `distributed.get_local_world_size`
    (looked up at call time), so while a dataset is built that answers LOCAL_SIZE; it is
    restored right after, and the process's environment is never written."""
    if "LOCAL_SIZE" not in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        yield
        return
    from streaming.base import distributed
    original, local_size = distributed.get_local_world_size, int(os.environ["LOCAL_SIZE"])
    distributed.get_local_world_size = lambda: local_size
    try:
        yield
    finally:
        distributed.get_local_world_size = original


def unlink_shm_allreduce_segment() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (the `deepspeed_shm_comm` op, 0.19.x) creates one
    67 MB /dev/shm segment per rank, named `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_
    <MASTER_PORT>_<rank>`, and never unlinks it: every CPU run left W × 67 MB of RAM behind.
    Each rank maps every other rank's segment inside `deepspeed.init_distributed`; after a
    barrier the names are no longer needed, so each rank unlinks its own. The memory lives while
    the ranks map it and is gone when they exit, SIGKILL included. Call after init_distributed."""
    import torch.distributed as dist
    if "MASTER_PORT" not in os.environ or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not all ranks local: DeepSpeed made no segment
        pass


def remove_filelocks_at_exit(dataset) -> None:
    """Streaming's two filelocks per dataset (`<prefix>_barrier_filelock`, `<prefix>_cache_
    filelock` in the temporary directory; streaming 0.13) outlive the run: its shared memory is
    reclaimed by the next run's stale-memory cleaner, the filelocks never are. Removed when this
    process exits (a rank still waiting on one recreates it: harmless)."""
    import atexit
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    paths = [os.path.join(dataset._filelock_root, f"{dataset._shm_prefix_int:06}_{kind}")
             for kind in (BARRIER_FILELOCK, CACHE_FILELOCK)]

    def remove():
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
    atexit.register(remove)


def clean_stale_shared_memory() -> None:
    from streaming.base.util import clean_stale_shared_memory as clean
    clean()


def record_shard_failures(dataset, on_failure: Callable[[BaseException, object | None],
                                                         BaseException]) -> None:
    """Patch 2: a shard that fails to load (download, checksum) ends its epoch with the error
    `on_failure(err, stream)` returns, raised where the samples are read; never a hang.

    Streaming (0.13) prepares shards in two threads per epoch (one downloads ahead, one waits
    until each sample's shard is local) and only logs their exceptions. Left alone, a failed
    shard stays PREPARING and a reader waiting for it spins forever; a thread that raises never
    counts as exited, so when both threads fail on one shard (the second retrying it in the
    moment after the first failed) the epoch's end (`_Iterator.exit`) waits forever; otherwise
    the epoch just ends early. Here the first failure is reported once; it stops the epoch's
    threads (their event, set before the shard goes back to REMOTE, so none retries it); each
    thread counts as exited however it ends; and the sample loop raises the error when it
    stops, in a DataLoader worker too (torch re-raises it in the main process). Another rank of
    the machine waiting for that shard is ended by the launcher when this rank exits."""
    from streaming.base.dataset import _ShardState

    reported: list[BaseException] = []

    def report(err: BaseException, stream) -> BaseException:
        if not reported:
            reported.append(on_failure(err, stream))
        if hasattr(dataset, "_event"):  # created by the first epoch
            dataset._event.set()
        return reported[0]

    for stream in dataset.streams:
        prepare = stream.prepare_shard

        def guarded(shard, prepare=prepare, stream=stream):
            try:
                return prepare(shard)
            except Exception as err:
                error = report(err, stream)
                dataset._shard_states[dataset.shards.index(shard)] = _ShardState.REMOTE
                raise error from None
        stream.prepare_shard = guarded

    for name in ("_prepare_thread", "_ready_thread"):
        def counted(it, body=getattr(dataset, name)):
            try:
                body(it)
            except Exception as err:  # reported (first one wins), raised by the sample loop
                report(err, None)
                it.on_exit()

        setattr(dataset, name, counted)

    def samples_then_failure(it, samples=dataset._each_sample_id):
        yield from samples(it)
        if reported:
            raise reported[0]
    dataset._each_sample_id = samples_then_failure


def check_on_first_read(dataset, check: Callable[[object, object], None]) -> None:
    """Patch 3: `check(shard, stream)` runs before a shard's first sample is read, once; then
    the shard's own `get_sample_data` is back (no cost from then on)."""
    for shard_id, shard in enumerate(dataset.shards):
        stream = dataset.streams[dataset.stream_per_shard[shard_id]]

        def first_read(idx, shard=shard, stream=stream):
            check(shard, stream)
            del shard.get_sample_data  # back to the class's method
            return shard.get_sample_data(idx)
        shard.get_sample_data = first_read


def rebuild_raw_shard(stream, shard, zip_info, packed: str, raw: str) -> None:
    """Decompress `packed` (fetched again from the remote if the cache dropped it) over `raw`;
    streaming verifies the compressed file's own checksum on the way."""
    if not os.path.isfile(packed) and stream.remote is not None:
        stream._download_file(zip_info.basename)
    stream._decompress_shard_part(zip_info, packed, raw, shard.compression)


# --- console -------------------------------------------------------------------------------------
def set_deepspeed_log_level(level: int) -> None:
    """DeepSpeed's own logger (it sets its level when imported: import first, then set)."""
    from deepspeed.utils import logger
    logger.setLevel(level)


def hide_build_notices() -> None:
    """Patch 4: DeepSpeed `print`s "DeepSpeed ... built successfully" (not through its logger)
    whenever it loads its CPU shared-memory collectives at `init_distributed`; the build runs
    with stdout muted. A build that fails still raises."""
    import importlib
    import io
    # by module name: the attribute `deepspeed.comm.torch` is the torch package it imports
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    build = ds_comm.build_shm_op
    if getattr(build, "pmp_quiet", False):
        return

    def quiet_build():
        with contextlib.redirect_stdout(io.StringIO()):
            return build()
    quiet_build.pmp_quiet = True
    ds_comm.build_shm_op = quiet_build
