"""Session fixtures: a tiny real dataset, and shared multi-rank DeepSpeed launches; a session
that leaves /tmp and /dev/shm as it found them.

Shared helpers live in tests/helpers.py: test files import them from there, not from here.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

pytest.register_assert_rewrite("dist.scenarios")  # its checks run as tests

from helpers import CORPUS, REPO, launch, run_scenarios  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# --- a test session leaves /tmp and /dev/shm as it found them -----------------------------------
# Everything the session and the processes it starts write to the temporary directory (pytest's
# tmp_path, streaming's filelocks, caches, launched ranks' scratch) goes into one directory of
# its own, removed at the end (kept, and named, when a test failed). Streaming's shared memory
# of this process is released after each module (streaming itself would wait for the exit).
WATCHED = (Path(tempfile.gettempdir()), Path("/dev/shm"))
SESSION_TMP = Path(tempfile.mkdtemp(prefix="pmp-tests-"))
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = str(SESSION_TMP)
_found: dict[Path, set[str]] = {}
_streaming_shm: list = []


def _listing(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def _track_streaming_shared_memory() -> None:
    """Record each streaming shared-memory block this process opens or creates, to release it
    when its module is done (streaming registers its release only for the process's exit)."""
    from streaming.base.shared import memory
    if getattr(memory.SharedMemory.__init__, "tracked", False):
        return
    init = memory.SharedMemory.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _streaming_shm.append(self)
    tracked.tracked = True
    memory.SharedMemory.__init__ = tracked


def release_streaming_shared_memory() -> None:
    """Close this process's streaming blocks and unlink those it created. Only between modules:
    a loader still iterating would lose its blocks."""
    while _streaming_shm:
        block = _streaming_shm.pop()
        atexit.unregister(block.cleanup)
        for shm in block.created_shms:
            if shm._mmap is None:  # closed: streaming released it itself (an epoch's blocks)
                continue
            try:
                shm.unlink()
            except FileNotFoundError:  # a launched run's stale-memory cleaner was first
                resource_tracker.unregister(shm._name, "shared_memory")
        for shm in block.created_shms + block.opened_shms:
            try:
                shm.close()
            except BufferError:  # a numpy view still holds it: unmapped when that one goes
                pass


def pytest_sessionstart(session):
    _found.update({path: _listing(path) for path in WATCHED})
    _track_streaming_shared_memory()


def _remove_killed_ranks_buffers() -> None:
    """DeepSpeed's CPU all-reduce buffers (/dev/shm/deepspeed_allreduce_buffer_*) of ranks
    killed before `ds_internals.unlink_shm_allreduce_segment` ran (inside DeepSpeed's own init;
    every later kill leaves nothing): a killed process cannot unlink its own, so the session
    that killed it does (only those that appeared during this session). The launcher test
    checks that a finished run leaves none, so this net hides no regression of that fix."""
    shm = Path("/dev/shm")
    for name in _listing(shm) - _found.get(shm, set()):
        if name.startswith("deepspeed_allreduce_buffer_"):
            (shm / name).unlink(missing_ok=True)


def pytest_sessionfinish(session, exitstatus):
    """Leftovers in /tmp or /dev/shm fail the session under PMP_TEST_LEFTOVERS=fail (CI: the
    machine is the run's alone), otherwise they are reported: on a shared machine other
    processes create and remove entries there too."""
    release_streaming_shared_memory()
    if session.config.option.collectonly:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
        return
    if exitstatus == 0:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
    _remove_killed_ranks_buffers()
    left = sorted(str(path / name) for path in WATCHED
                  for name in _listing(path) - _found.get(path, set())
                  if path / name != SESSION_TMP)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter and (left or SESSION_TMP.exists()):
        reporter.write("\n")
    if SESSION_TMP.exists() and reporter:
        reporter.write_line(f"test scratch kept for inspection: {SESSION_TMP}")
    if left and reporter:
        reporter.write_line(f"left behind by this session (or by others on this machine): "
                            f"{', '.join(left[:20])}{' ...' if len(left) > 20 else ''}",
                            yellow=True)
        if os.environ.get("PMP_TEST_LEFTOVERS") == "fail" and exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The first test to ask for the session's shared launches waits for all of them (minutes; each
# launch also has its own limit, tests/helpers.py `launch`).
SHARED_LAUNCHES = {"dist_results", "launcher_run"}
SHARED_LAUNCH_TIMEOUT = 2400


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SHARED_LAUNCHES & set(item.fixturenames) and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SHARED_LAUNCH_TIMEOUT))


@pytest.fixture(scope="module", autouse=True)
def _release_streaming_after_module():
    yield
    release_streaming_shared_memory()


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    """Each test module starts from the environment the session started with: HF Trainer,
    accelerate and the fine-tuner's W=1 group write rank variables (LOCAL_WORLD_SIZE,
    ACCELERATE_MIXED_PRECISION, ...) that later launches would otherwise inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 512-piece SentencePiece model and seq-64 MDS shards from two of the books."""
    from pmp_scale.data import prepare_dataset, train_sentencepiece
    root = tmp_path_factory.mktemp("tiny_data")
    books = [str(CORPUS / "persuasion.txt.gz"), str(CORPUS / "northangerabbey.txt.gz")]
    model = train_sentencepiece(books, str(root / "spm"), vocab_size=512)
    prepare_dataset(books, model, root / "mds", seq_len=64, val_fraction=0.05, progress=False)
    return {"data": str(root / "mds"), "tokenizer": model}


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory, tiny_data):
    """The directory the session's shared multi-rank launches wrote (tests/dist/scenarios.py:
    SESSION); the second W=2 launch resumes the first's stopped runs in fresh processes."""
    from dist.scenarios import session_launches
    out = tmp_path_factory.mktemp("dist")
    for world, names in session_launches():
        run_scenarios(out, tiny_data, names, world)
    return out


@pytest.fixture(scope="session")
def save_tiny_llama(tiny_data):
    """save(dir) -> model: a randomly initialised llama-tiny HF directory (weights + the tiny
    tokenizer), the shape of a small release."""
    def save(out, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM
        from pmp_scale.data import load_tokenizer
        from pmp_scale.models import build_hf_config
        tok = load_tokenizer(tiny_data["tokenizer"])
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            build_hf_config("llama-tiny", tokenizer_vocab_size=tok.vocab_size))
        model.save_pretrained(out, safe_serialization=True)
        tok.save_hf(out)
        return model
    return save


@pytest.fixture(scope="module")
def single_process_group():
    """One in-process W=1 process group for a module (the fine-tuner's engine). Its
    LOCAL_RANK=0 is set here, as an entry point sets it, and removed after. One thread: tiny
    models gain nothing from more, and lose a lot on a shared machine."""
    import torch
    import torch.distributed as dist
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                            "MASTER_ADDR", "MASTER_PORT")}
    os.environ["LOCAL_RANK"] = "0"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if dist.is_initialized():
        dist.destroy_process_group()
        # DeepSpeed caches groups of the destroyed one (its world / data-parallel groups): the
        # next module's group would otherwise be handed a dead group ("is not registered").
        from deepspeed.utils import groups
        for name, value in vars(groups).copy().items():
            if name.isupper() and name.endswith("_GROUP") and value is not None:
                setattr(groups, name, None)


@pytest.fixture(scope="session")
def launcher_run(tmp_path_factory, tiny_data):
    """The real entry point: `deepspeed --num_gpus 2 launchers/pretrain.py --config ...`. Not
    `tiny_run_config` on purpose: tensorboard and the optimizer stay at their defaults, as in a
    user's first config."""
    import yaml
    root = tmp_path_factory.mktemp("launcher")
    cfg = {"run_dir": str(root / "run"), "seed": 3, "model": {"preset": "gpt2-tiny"},
           "data": {"path": tiny_data["data"], "tokenizer": tiny_data["tokenizer"]},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4,
                     "log_every": 2, "eval_every": 2, "eval_batches": 2},
           "optim": {"lr": 3e-3, "warmup_steps": 1}, "checkpoint": {"every": 2, "keep": 1}}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    shm, tmp = Path("/dev/shm"), Path(tempfile.gettempdir())
    before = _listing(shm) | _listing(tmp)
    proc = launch(REPO / "launchers" / "pretrain.py",
                  ["--config", str(root / "run.yaml"), "--set", "optim.lr=2e-3"], 2)
    return {"proc": proc, "run_dir": root / "run",
            "left": sorted((_listing(shm) | _listing(tmp)) - before)}
