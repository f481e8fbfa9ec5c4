"""Session fixtures: a tiny real dataset, and shared multi-rank DeepSpeed launches.

Shared helpers live in tests/helpers.py: test files import them from there, not from here.
"""
from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("dist.scenarios")  # its checks run as tests

from helpers import CORPUS, REPO, launch, run_scenarios  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")


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
    proc = launch(REPO / "launchers" / "pretrain.py",
                  ["--config", str(root / "run.yaml"), "--set", "optim.lr=2e-3"], 2)
    return {"proc": proc, "run_dir": root / "run"}
