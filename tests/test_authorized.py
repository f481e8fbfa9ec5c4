"""The licensee kit (pmp_scale/authorized.py): authorized fine-tuning with HF Trainer, a plain
PyTorch loop, DDP and any torch optimizer keeps the complement bit-exactly at the release; the
loss curve equals launchers/finetune.py's authorized mode; bad inputs fail with one line.

A tiny llama release (save_pretrained + tokenizer) and a random rho = 0.7 mask bound to it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import torch

from helpers import REPO, free_port, full_masks

sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pmp_scale.authorized import AuthorizationError, with_private_mask  # noqa: E402
from pmp_scale.mask import pack_bits, write_artifact  # noqa: E402
from pmp_scale.release import record_release, release_sha256  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_mask(model, out, seed=1, release=None):
    g = torch.Generator().manual_seed(seed)
    write_artifact(out, [(n, pack_bits(torch.rand(p.numel(), generator=g) < 0.7), tuple(p.shape))
                         for n, p in model.named_parameters()], {"mask_ratio": 0.7})
    if release is not None:
        record_release(out, release_sha256(release), "fp32")


@pytest.fixture(scope="module")
def rel(save_tiny_llama, tmp_path_factory):
    """{release, mask, task (review_lm blocks of 32 tokens), masks (name -> bool mask)}."""
    from pmp_scale.finetune.config import TaskConfig
    from pmp_scale.finetune.tasks import build_task, load_hf_tokenizer
    root = tmp_path_factory.mktemp("kit")
    model = save_tiny_llama(root / "release")
    _write_mask(model, root / "mask", release=root / "release")
    masks = full_masks(root / "mask")
    task = build_task(TaskConfig(name="review_lm", max_length=32, max_train_examples=64,
                                 max_eval_examples=16), load_hf_tokenizer(root / "release"))
    return {"release": root / "release", "mask": root / "mask", "masks": masks, "task": task,
            "root": root}


def load(rel):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(rel["release"], local_files_only=True)


def release_weights(rel) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(rel["release"] / "model.safetensors"))


def assert_authorized(rel, params: dict[str, torch.Tensor]) -> None:
    """Complement bit-exact (as integers), and most masked elements moved."""
    ref, masks = release_weights(rel), rel["masks"]
    moved = 0
    for name, value in params.items():
        keep = masks[name]
        a, b = value.detach()[~keep].contiguous(), ref[name][~keep].contiguous()
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name}: complement moved"
        moved += int((value.detach() != ref[name])[keep].sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values()), "the mask did not train"


def lm_dataset(task, split="train"):
    return [{"input_ids": x, "labels": x} for x in task.splits[split]]


def licensee_snippets() -> list[str]:
    """The fenced python blocks of the README's "For licensees" section, verbatim."""
    text = (REPO / "README.md").read_text()
    section = text.split("## For licensees", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


# --- what a licensee runs -------------------------------------------------------------------------
def test_readme_trainer_snippet_bf16_accumulation_clipping(rel, tmp_path):
    """The README's HF Trainer lines, as written there, with AdamW weight decay, clipping,
    gradient accumulation and bf16 autocast."""
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                             lr_scheduler_type="constant", bf16=True, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    ns = {"release_dir": str(rel["release"]), "mask_dir": str(rel["mask"]),
          "out_dir": str(tmp_path / "out"), "args": args, "train_dataset": lm_dataset(rel["task"])}
    snippets = licensee_snippets()
    assert len(snippets) == 2 and "Trainer(" in snippets[0]
    exec(snippets[0], ns)
    try:
        assert ns["trainer"].state.global_step == 4
        assert ns["trainer"].accelerator.mixed_precision == "bf16"  # autocast, fp32 parameters
        callbacks = ns["trainer"].callback_handler.callbacks
        assert any(type(c).__name__ == "AuthorizedCallback" for c in callbacks)
        assert_authorized(rel, dict(ns["model"].named_parameters()))
        saved = load({**rel, "release": tmp_path / "out"})  # a standard HF model directory
        assert_authorized(rel, dict(saved.named_parameters()))
    finally:
        ns["mask"].remove()


def test_readme_plain_loop_snippet(rel):
    task = rel["task"]
    loader = [task.collate("train", range(i, i + 4)) for i in range(0, 12, 4)]
    ns = {"release_dir": str(rel["release"]), "mask_dir": str(rel["mask"]), "device": "cpu",
          "loader": loader}
    exec(licensee_snippets()[1], ns)
    try:
        assert_authorized(rel, dict(ns["model"].named_parameters()))
    finally:
        ns["mask"].remove()


def test_example_script_fine_tunes_and_saves(rel, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    from authorized_hf_trainer import main
    out = tmp_path / "tuned"
    assert main(["--release", str(rel["release"]), "--mask", str(rel["mask"]), "--out", str(out),
                 "--steps", "3", "--max-length", "32", "--batch-size", "4", "--lr", "1e-2",
                 "--max-eval-blocks", "8"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"complement intact: all [\d,]+ complement elements equal the release", text)
    assert_authorized(rel, dict(load({**rel, "release": out}).named_parameters()))
    assert (out / "tokenizer_config.json").is_file()


# --- optimizers, DDP ------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.1),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adafactor_torch": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1),
    "adafactor_hf": lambda ps: __import__("transformers").Adafactor(
        ps, lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_any_torch_optimizer_keeps_the_complement(rel, name, monkeypatch):
    """Gradient accumulation (2 micro-batches) and clipping; the complement of every gradient
    is zero when clipping sees it, and bit-exact after every step. Restored in chunks of 40
    elements here (4M by default), so chunk boundaries inside tensors are exercised."""
    import pmp_scale.chunking
    monkeypatch.setattr(pmp_scale.chunking, "CHUNK", 40)
    model, task = load(rel), rel["task"]
    mask = with_private_mask(model, rel["mask"])
    try:
        optimizer = OPTIMIZERS[name](model.parameters())
        for step in range(3):
            for m in range(2):
                batch = task.collate("train", range(8 * step + 4 * m, 8 * step + 4 * m + 4))
                (model(**batch).loss / 2).backward()
            for n, p in model.named_parameters():
                assert not p.grad[~rel["masks"][n]].any(), f"{n}: complement gradient"
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
            assert mask.complement_moved() == 0
        assert_authorized(rel, dict(model.named_parameters()))
    finally:
        mask.remove()


def test_without_the_kit_the_same_loop_moves_the_complement(rel):
    """The control: these checks do fail when the hooks are off (weight decay alone moves it)."""
    model, task = load(rel), rel["task"]
    mask = with_private_mask(model, rel["mask"])
    mask.remove()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**task.collate("train", range(4))).loss.backward()
    optimizer.step()
    assert mask.complement_moved() > 0.9 * mask.complement_numel
    with pytest.raises(AssertionError, match="complement moved"):
        assert_authorized(rel, dict(model.named_parameters()))


def _ddp_worker(rank: int, world: int, release: str, mask_dir: str, out: str, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    model = AutoModelForCausalLM.from_pretrained(release, local_files_only=True)
    mask = with_private_mask(model, mask_dir)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(rank)  # every rank its own data
    for _ in range(3):
        for m in range(2):
            ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)
            with ddp.no_sync() if m == 0 else __import__("contextlib").nullcontext():
                (ddp(input_ids=ids, labels=ids).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    torch.save({"moved": mask.complement_moved(),
                "params": {n: p.detach() for n, p in model.named_parameters()}},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_the_complement(rel, tmp_path):
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, str(rel["release"]), str(rel["mask"]), str(tmp_path), port),
             nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["moved"] == r1["moved"] == 0
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), f"{name}: ranks disagree"
    assert_authorized(rel, r0["params"])


# --- the same run as launchers/finetune.py --set mode=authorized ----------------------------------
def test_loss_curve_equals_the_deepspeed_authorized_finetune(rel, single_process_group):
    """Same release, mask, batches (finetune's SampleOrder), AdamW + decay groups, LR schedule,
    clipping and accumulation: the kit in a plain loop vs pmp_scale.finetune at 1 rank (ZeRO-3).
    Not bit-exact: DeepSpeed computes the global norm over its flat fp32 partition and clips
    with grad / ((norm + 1e-6) / c) where torch uses grad * (c / (norm + 1e-6)). Measured: the
    first two losses equal, then 4e-8 relative (tolerance 1e-5); weights within 6e-6 after 4
    steps (Adam magnifies rounding where the second moment is near zero; tolerance 1e-4)."""
    import deepspeed
    from pmp_scale.zero3 import param_groups
    from pmp_scale.finetune.config import parse_finetune_config
    from pmp_scale.finetune.train import Finetuner, SampleOrder, lr_factor
    steps, mb, ga = 4, 4, 2
    cfg = parse_finetune_config({
        "release": str(rel["release"]), "mode": "authorized", "mask": str(rel["mask"]), "seed": 0,
        "task": {"name": "review_lm", "max_length": 32, "max_train_examples": 64,
                 "max_eval_examples": 16},
        "train": {"micro_batch_size": mb, "global_batch_size": mb * ga, "max_steps": steps,
                  "eval_at_start": False},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.1,
                  "grad_clip": 0.5}})
    task = rel["task"]
    ft = Finetuner(cfg, task=task)
    try:
        theirs = [loss for _, loss in ft.run()["train_loss"]]
        tuned = {}
        for n, p in ft.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                tuned[n] = p.detach().clone()
    finally:
        ft.close()

    model, o = load(rel), cfg.optim
    mask = with_private_mask(model, rel["mask"])
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas,
                                  eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o, steps))
    order, ours = SampleOrder(task.size("train"), cfg.seed), []
    try:
        for step in range(steps):
            total = 0.0
            for m in range(ga):
                start = step * mb * ga + m * mb
                batch = task.collate("train", [order[i] for i in range(start, start + mb)])
                loss = model(**batch).loss
                (loss / ga).backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            ours.append(total / ga)
    finally:
        mask.remove()
    print("losses: kit", ours, "deepspeed", theirs)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=0)
    assert theirs[-1] < theirs[0]
    diff = max((p.detach() - tuned[n]).abs().max().item() for n, p in model.named_parameters())
    print("max |weight difference| after", steps, "steps:", diff)
    assert diff < 1e-4
    assert_authorized(rel, dict(model.named_parameters()))


# --- guard rails: one clear line each -------------------------------------------------------------
def refused(model, mask_dir, match: str, **kw) -> str:
    with pytest.raises(AuthorizationError, match=match) as err:
        with_private_mask(model, mask_dir, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_model_fine_tuned_without_the_mask_is_refused(rel):
    model = load(rel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # unauthorized: everything moves
    batch = rel["task"].collate("train", range(4))
    model(**batch).loss.backward()
    optimizer.step()
    moved = sum(int((p.detach() != release_weights(rel)[n])[~rel["masks"][n]].sum())
                for n, p in model.named_parameters())
    assert moved > 0
    refused(model, rel["mask"], rf"already differs from the release on {moved} of \d+ complement")


def test_wrong_mask_is_refused(rel, tmp_path):
    other = tmp_path / "mask"
    shutil.copytree(rel["mask"], other)
    meta = json.loads((other / "mask.json").read_text())
    meta["release_sha256"] = "0" * 64
    (other / "mask.json").write_text(json.dumps(meta))
    refused(load(rel), other, r"mask belongs to another release: .* records release sha256 0{16}")
    del meta["release_sha256"]
    (other / "mask.json").write_text(json.dumps(meta))
    refused(load(rel), other, r"records no release_sha256.*allow_unbound=True")
    with_private_mask(load(rel), other, allow_unbound=True).remove()


def test_corrupt_mask_file_is_refused(rel, tmp_path):
    bad = tmp_path / "mask"
    shutil.copytree(rel["mask"], bad)
    data = (bad / "mask.safetensors").read_bytes()
    (bad / "mask.safetensors").write_bytes(data[: len(data) // 2])
    refused(load(rel), bad, r"^corrupt or unreadable mask: .*mask.safetensors")
    (bad / "mask.json").write_text("{not json")
    refused(load(rel), bad, r"^corrupt or unreadable mask: .*mask.json: cannot read")


def test_mask_of_another_architecture_is_refused(rel, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    config = AutoConfig.from_pretrained(rel["release"])
    config.intermediate_size = 128  # same names, other MLP shapes
    _write_mask(AutoModelForCausalLM.from_config(config), tmp_path / "wide")
    refused(load(rel), tmp_path / "wide", r"^mask for another architecture .*: \d+ parameter\(s\) "
                                          r"differ in name or shape, e\.g\. 'model\.layers\.0\.mlp")
    _write_mask(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2)), tmp_path / "gpt2")
    refused(load(rel), tmp_path / "gpt2", r"names none of the model's parameters")


def test_release_is_required(rel, tmp_path):
    model = load(rel)
    refused(model, rel["mask"], r"is not a release directory", release_dir=tmp_path)


def test_peft_models_are_refused(rel):
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(load(rel), LoraConfig(r=2, target_modules=["q_proj"]))
    refused(lora, rel["mask"], r"^LoRA/PEFT adapters cannot be authorized: a low-rank update BA "
                               r"is dense in the base weights")
    model = load(rel)  # adapters added after the mask: the Trainer callback refuses to start
    mask = with_private_mask(model, rel["mask"])
    try:
        lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(AuthorizationError, match="LoRA/PEFT adapters cannot be authorized"):
            mask.callback().on_train_begin(None, None, None, model=lora, optimizer=None)
    finally:
        mask.remove()


def test_callback_refuses_what_the_hooks_cannot_see(rel):
    """A copy of the model (or one re-wrapped by a sharding wrapper) and an optimizer over other
    parameters are refused when training starts; the model and optimizer themselves pass."""
    import copy
    model = load(rel)
    mask = with_private_mask(model, rel["mask"])
    begin = mask.callback().on_train_begin
    try:
        other = copy.deepcopy(model)
        with pytest.raises(AuthorizationError, match=r"^the model being trained does not hold"):
            begin(None, None, None, model=other, optimizer=None)
        with pytest.raises(AuthorizationError, match=r"^the optimizer holds none of the masked"):
            begin(None, None, None, model=model,
                  optimizer=torch.optim.AdamW(other.parameters()))
        begin(None, None, None, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    finally:
        mask.remove()


def test_drift_is_reported_and_the_mask_stays_packed(rel):
    model = load(rel)
    mask = with_private_mask(model, rel["mask"])
    try:
        complement = sum(int((~m).sum()) for m in rel["masks"].values())
        assert mask.assert_complement_intact() == complement
        for e in mask._entries:  # resident: 1 bit per element + the complement's values
            assert e.packed.dtype == torch.uint8 and e.packed.numel() == (e.param.numel() + 7) // 8
        assert sum(e.frozen.numel() for e in mask._entries) == complement
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)  # outside any optimizer: nothing restores it
        n = int((~rel["masks"]["model.norm.weight"]).sum())
        with pytest.raises(AuthorizationError, match=rf"^{n} of \d+ complement elements moved"):
            mask.assert_complement_intact()
        model.resize_token_embeddings(model.config.vocab_size + 8)  # new, unhooked tensors
        with pytest.raises(AuthorizationError,
                           match=r"^(lm_head|model\.embed_tokens)\.weight was replaced"):
            mask.assert_complement_intact()
    finally:
        mask.remove()


def test_trl_sft_trainer_with_the_callback(rel, tmp_path):
    """TRL's SFTTrainer is a Trainer: the same callback line; with its `peft_config` (LoRA) the
    callback refuses to start."""
    import trl  # a test dependency (the dev extra): small, and nothing new beyond it
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(rel["release"], local_files_only=True)
    texts = Dataset.from_dict({"text": [tok.decode(x) for x in rel["task"].splits["train"][:32]]})

    def sft(model, mask, **kw):
        config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                               learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                               max_length=32, use_cpu=True, report_to=[], save_strategy="no",
                               disable_tqdm=True, dataloader_num_workers=0)
        return trl.SFTTrainer(model=model, args=config, train_dataset=texts, processing_class=tok,
                              callbacks=[mask.callback()], **kw)
    model = load(rel)
    mask = with_private_mask(model, rel["mask"])
    try:
        sft(model, mask).train()
        assert_authorized(rel, dict(model.named_parameters()))
    finally:
        mask.remove()
    model = load(rel)
    mask = with_private_mask(model, rel["mask"])
    try:
        with pytest.raises(AuthorizationError, match="LoRA/PEFT adapters cannot be authorized"):
            sft(model, mask, peft_config=LoraConfig(r=2, target_modules=["q_proj"])).train()
    finally:
        mask.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hooks_never_synchronise_the_host_on_cuda(rel):
    """The gradient hooks (in backward) and the restore after a step run with CUDA's sync
    debug mode set to raise on any synchronising call. The model moves to the GPU after the
    mask is attached (as Trainer does): the packed mask follows it at the first step."""
    model = load(rel)
    mask = with_private_mask(model, rel["mask"])
    model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    batch = {k: v.cuda() for k, v in rel["task"].collate("train", range(4)).items()}
    try:
        for step in range(3):
            loss = model(**batch).loss
            if step:  # the first step moves the packed mask and release values once
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss.backward()
                optimizer.step()  # SGD (foreach on CUDA), then the kit's restore
            finally:
                torch.cuda.set_sync_debug_mode("default")
            optimizer.zero_grad()
        assert all(e.packed.is_cuda and e.frozen.is_cuda for e in mask._entries)
        assert_authorized(rel, {n: p.cpu() for n, p in model.named_parameters()})
    finally:
        mask.remove()
