"""Non-fine-tunability evaluation: the three fine-tuning modes end to end on a tiny release,
the report grid and its cache, the analyses, and bad inputs failing with one clear line.

Everything runs in this process on a W=1 DeepSpeed ZeRO-3 engine (the same engine as W>1).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch
import yaml

from helpers import REPO, full_masks, gathered, launch, with_overrides

sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pmp_scale.config import ConfigError  # noqa: E402
from pmp_scale.finetune.config import parse_finetune_config  # noqa: E402
from pmp_scale.finetune.tasks import TaskError, build_task, classification_metrics, split_of  # noqa: E402
from pmp_scale.finetune.release_check import MaskMismatchError, Release, check_mask  # noqa: E402
from pmp_scale.mask import pack_bits, unpack_bits, write_artifact  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _process_group(single_process_group):
    yield


@pytest.fixture(scope="module")
def tiny_release(save_tiny_llama, tmp_path_factory):
    """A llama-tiny HF release (save_pretrained + tokenizer) and a random ρ=0.7 private mask
    (norm weights always trained) bound to it by its release sha256."""
    from pmp_scale.release import record_release, release_sha256
    root = tmp_path_factory.mktemp("ft_release")
    model = save_tiny_llama(root / "release")
    g = torch.Generator().manual_seed(1)
    # Norm weights (constant-initialised) always trained, as pmp.exclude_constant_init does:
    # frozen ones would sit at 1.0 and the release path refuses such a model.
    items = [(n, pack_bits(torch.rand(p.numel(), generator=g) < 0.7 if p.dim() > 1
                           else torch.ones(p.numel(), dtype=torch.bool)), tuple(p.shape))
             for n, p in model.named_parameters()]
    write_artifact(root / "mask", items, {"mask_ratio": 0.7, "mask_source": "random"})
    record_release(root / "mask", release_sha256(root / "release"), "fp32")
    return {"release": root / "release", "mask": root / "mask", "root": root}


def ft_config(tiny_release, task: str, mode: str, **over) -> dict:
    raw = {"release": str(tiny_release["release"]), "mode": mode, "seed": 0,
           "mask": str(tiny_release["mask"]),
           "task": {"name": task, "max_length": 32, "max_train_examples": 64,
                    "max_eval_examples": 16},
           "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 3,
                     "eval_batch_size": 16},
           "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1}}
    return with_overrides(raw, over)


def release_weights(tiny_release) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(tiny_release["release"] / "model.safetensors"))


def run_and_gather(raw: dict):
    """Train; returns (result, params before, params after), gathered from the engine."""
    from pmp_scale.finetune.train import Finetuner
    ft = Finetuner(parse_finetune_config(raw))
    try:
        before = gathered(ft.model)
        result = ft.run()
        after = gathered(ft.model)
    finally:
        ft.close()
    return result, before, after


# --- the three modes ------------------------------------------------------------------------------
def test_authorized_lm_keeps_the_complement_bit_exact(tiny_release):
    result, before, after = run_and_gather(ft_config(tiny_release, "review_lm", "authorized"))
    release, masks = release_weights(tiny_release), full_masks(tiny_release["mask"])
    assert before.keys() == release.keys()
    for name, ref in release.items():
        assert torch.equal(before[name], ref), f"{name}: loaded weights differ from the release"
        frozen = ~masks[name]
        assert torch.equal(after[name][frozen], ref[frozen]), f"{name}: complement moved"
    moved = sum(int((after[n] != release[n])[masks[n]].sum()) for n in release)
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())  # the mask trains
    assert result["backbone"]["complement_changed"] == 0
    assert result["backbone"]["complement_max_abs_diff"] == 0.0
    assert result["final"]["validation"]["loss"] < result["curve"][0]["loss"]


def test_non_finite_gradient_skips_the_step(tiny_release, caplog):
    """A NaN loss at step 2 is skipped (weights untouched, complement still exact) and counted;
    the run goes on. Two in a row with nonfinite_max_in_a_row=2: diverged, stopped. The skips
    are pre-training's Divergence policy, logged through Telemetry."""
    import logging
    from pmp_scale.finetune.train import Finetuner
    ft = Finetuner(parse_finetune_config(ft_config(
        tiny_release, "review_lm", "authorized", train__max_steps=4,
        train__nonfinite_max_in_a_row=2)))
    forward, train_step, snapshots, bad_steps = ft._forward, ft.train_step, {}, {1}

    def poisoned_forward(batch):
        out = forward(batch)
        if ft._step in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    def recording_step(order, step):
        ft._step = step
        loss = train_step(order, step)
        snapshots[step] = gathered(ft.model)
        return loss
    ft._forward, ft.train_step, ft._step = poisoned_forward, recording_step, -1
    try:
        result = ft.run()
        assert result["skipped_steps"] == 1 and not result["diverged"]
        assert result["steps_done"] == 4 and math.isfinite(result["final"]["test"]["loss"])
        assert all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])
        assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])
        assert result["backbone"]["complement_changed"] == 0
        bad_steps.update({2, 3})
        with caplog.at_level(logging.INFO, logger="pmp_scale.finetune"):
            result = ft.run()
    finally:
        ft.close()
    assert result["diverged"] and result["steps_done"] == 3 and result["skipped_steps"] == 3
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skips == ["step 2 skipped: non-finite loss or gradient (1 in a row)",
                     "step 3 skipped: non-finite loss or gradient (2 in a row)"], skips


def finetune_and_export(tiny_release, task: str, export):
    """Authorized fine-tune, then export: (gathered fine-tuned params, export info)."""
    from pmp_scale.finetune.train import Finetuner
    ft = Finetuner(parse_finetune_config(ft_config(tiny_release, task, "authorized",
                                                   export={"dir": str(export)})))
    try:
        ft.run()
        return gathered(ft.model), ft.export(export)
    finally:
        ft.close()


def test_export_writes_the_fine_tuned_model_through_the_release_path(tiny_release, tmp_path):
    """Authorized LM fine-tune → export.dir: a flat, audited HF directory that loads with
    AutoModelForCausalLM and holds exactly the fine-tuned weights (complement still the release's)."""
    from transformers import AutoModelForCausalLM
    from pmp_scale.release import audit_files, release_sha256
    export = tmp_path / "export"
    tuned, info = finetune_and_export(tiny_release, "review_lm", export)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # temp checkpoint removed
    assert audit_files(export) == [] and info["sha256"] == release_sha256(export)
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    loaded = dict(model.named_parameters())
    assert loaded.keys() == tuned.keys()
    for name, value in tuned.items():
        assert torch.equal(loaded[name].detach(), value), f"{name}: exported != fine-tuned"
    release, masks = release_weights(tiny_release), full_masks(tiny_release["mask"])
    assert any(not torch.equal(tuned[n], release[n]) for n in release)
    for name, ref in release.items():
        assert torch.equal(tuned[name][~masks[name]], ref[~masks[name]])


def test_classifier_export_loads_as_its_own_architecture(tiny_release, tmp_path):
    """A fine-tuned classifier goes through the same release path: its config names the
    sequence-classification architecture, the audit loads and runs it, the weights are the
    fine-tuned ones (new head included)."""
    from transformers import AutoModelForSequenceClassification
    from pmp_scale.secrecy import audit_release
    export = tmp_path / "export"
    tuned, _ = finetune_and_export(tiny_release, "movie_reviews", export)
    audit = audit_release(export)
    assert not audit.problems, audit.problems
    assert any("LlamaForSequenceClassification" in line for line in audit.report)
    model = AutoModelForSequenceClassification.from_pretrained(export, local_files_only=True)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 2 and model.config.use_cache
    loaded = dict(model.named_parameters())
    assert loaded.keys() == tuned.keys() and "score.weight" in loaded
    for name, value in tuned.items():
        assert torch.equal(loaded[name].detach(), value), name


def test_export_is_refused_where_it_cannot_work(tiny_release, tmp_path):
    with pytest.raises(ConfigError, match="LoRA runs cannot be exported"):
        parse_finetune_config(ft_config(tiny_release, "review_lm", "unauthorized-lora",
                                        export={"dir": "x"}))
    from pmp_scale.finetune.train import finetune
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not empty; set export.overwrite=true"):
        finetune(parse_finetune_config(ft_config(tiny_release, "review_lm", "authorized",
                                                 export={"dir": str(tmp_path / "busy")})))


def test_authorized_classification_trains_the_new_head(tiny_release):
    result, before, after = run_and_gather(ft_config(tiny_release, "movie_reviews", "authorized"))
    release, masks = release_weights(tiny_release), full_masks(tiny_release["mask"])
    assert "score.weight" in after and "score.weight" not in release
    assert before["score.weight"].abs().max() > 0  # initialised, not left empty
    assert (after["score.weight"] != before["score.weight"]).float().mean() > 0.9
    for name in after:
        if name in release:
            assert torch.equal(after[name][~masks[name]], release[name][~masks[name]]), name
    assert result["backbone"]["complement_changed"] == 0
    assert set(result["final"]["test"]) == {"loss", "accuracy", "f1", "matthews"}


@pytest.mark.parametrize("task", ["movie_reviews", "review_lm"])
def test_lora_trains_only_adapters_and_head(tiny_release, task):
    """Classification: adapters + the new head train; LM (no new head): adapters only."""
    result, before, after = run_and_gather(
        ft_config(tiny_release, task, "unauthorized-lora", mask=None))
    release = release_weights(tiny_release)
    adapters = [n for n in after if ".lora_" in n]
    assert adapters and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"))
                            for n in adapters)
    for name, value in after.items():
        backbone = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".lora_" in name or backbone == "score.weight":
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, release[backbone]), f"backbone {name} changed"
    assert result["backbone"]["changed"] == 0
    head = after["base_model.model.score.weight"].numel() if task == "movie_reviews" else 0
    assert result["params"]["trainable"] == sum(after[n].numel() for n in adapters) + head
    assert result["params"]["trainable"] < 0.2 * result["params"]["total"]


def test_unauthorized_launcher_changes_the_complement(tiny_release, tmp_path, capsys):
    from launchers.finetune import main
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(ft_config(tiny_release, "review_lm", "unauthorized",
                                            out_dir=str(tmp_path / "out"))))
    assert main(["--config", str(cfg), "--set", "train.max_steps=2",
                 "--set", f"export.dir={tmp_path / 'export'}"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps_done"] == 2 and result["mode"] == "unauthorized"
    from pmp_scale.telemetry import read_metrics  # the run's scalars, as pre-training writes them
    metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "val/loss" in metrics[0] and "train/loss" in metrics[1] and "test/loss" in metrics[2]
    b = result["backbone"]
    assert b["complement_changed"] > 0.5 * b["complement"]  # the whole release moves
    assert result["export"]["dir"] == str(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert '"mode": "unauthorized"' in out and '"sha256"' in out


def test_authorized_under_the_deepspeed_launcher_at_three_ranks(tiny_release, tmp_path):
    """W=3 (most parameters split with padding): the mask is sliced per rank like ZeRO-3, the
    complement stays the release's bit for bit, and the export gathers every rank's partition."""
    from safetensors.torch import load_file
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(ft_config(
        tiny_release, "review_lm", "authorized", out_dir=str(tmp_path / "out"),
        train__micro_batch_size=2, train__global_batch_size=6,
        export={"dir": str(tmp_path / "export")})))
    proc = launch(REPO / "launchers" / "finetune.py", ["--config", str(cfg)], world_size=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["backbone"]["complement_changed"] == 0 and result["steps_done"] == 3
    tuned = load_file(str(tmp_path / "export" / "model.safetensors"))
    release, masks = release_weights(tiny_release), full_masks(tiny_release["mask"])
    assert any(masks[n].numel() % 3 for n in masks)  # padding is exercised
    assert tuned.keys() == release.keys()
    moved = 0
    for name, ref in release.items():
        assert torch.equal(tuned[name][~masks[name]], ref[~masks[name]]), name
        moved += int((tuned[name] != ref)[masks[name]].sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())


# --- the report and the analyses ------------------------------------------------------------------
def test_report_grid_runs_caches_and_writes(tiny_release, tmp_path, capsys):
    from tools.nft_report import main
    base = tmp_path / "ft.yaml"
    base.write_text(yaml.safe_dump(ft_config(tiny_release, "review_lm", "unauthorized",
                                             mask=None, train__max_steps=1)))
    report = tmp_path / "report.yaml"
    report.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "report"), "finetune": "ft.yaml",
        "releases": [{"name": "dense", "release": str(tiny_release["release"])},
                     {"name": "pmp", "release": str(tiny_release["release"]),
                      "mask": str(tiny_release["mask"]), "modes": ["unauthorized", "authorized"]}],
        "lrs": [1e-2], "steps": [1, 2], "seeds": [0, 1], "min_seeds": 2}))
    assert main(["--config", str(report), "--quiet"]) == 0
    out = tmp_path / "report"
    doc = json.loads((out / "results.json").read_text())
    assert len(list((out / "cells").glob("*.json"))) == 3 * 2  # one run serves both durations
    assert doc["timing"]["cached"] == 0
    assert {g["label"].split(":")[0] for g in doc["gaps"]} >= {"non-fine-tunability gap",
                                                              "authorized recovery"}
    for png in ("metric_vs_lr.png", "curves.png", "summary.png"):
        assert (out / png).stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "| pmp | authorized |" in text
    # backbone integrity rows: | release mode | runs | changed of elements | complement changed of N |
    masks = full_masks(tiny_release["mask"])
    frozen = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| pmp ") and " of " in line}
    auth, unauth = rows["pmp authorized"], rows["pmp unauthorized"]
    assert auth[1] == "2" and auth[3] == f"0 of {2 * frozen:,}"  # 2 seeds, nothing moved
    assert auth[2].endswith(f" of {2 * total:,}") and auth[2] != f"0 of {2 * total:,}"
    assert int(unauth[3].split(" of ")[0].replace(",", "")) > 0
    assert main(["--config", str(report), "--quiet"]) == 0  # rerun: everything cached
    assert json.loads((out / "results.json").read_text())["timing"]["cached"] == 6
    assert "Summary" in capsys.readouterr().out
    cell = sorted((out / "cells").glob("*.json"))[0]
    cell.write_text(cell.read_text()[:100])  # an interrupted write: a cache miss, not a crash
    assert main(["--config", str(report), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["timing"]["cached"] == 5
    assert json.loads(cell.read_text())["cell"] == cell.stem
    assert not list((out / "cells").glob(".*.tmp"))
    # the same grid in two worker processes: the same cells, the same curves
    spec = yaml.safe_load(report.read_text())
    report.write_text(yaml.safe_dump({**spec, "out_dir": str(tmp_path / "side"), "workers": 2}))
    assert main(["--config", str(report), "--quiet"]) == 0
    side = {p.name: json.loads(p.read_text()) for p in (tmp_path / "side" / "cells").glob("*.json")}
    assert side.keys() == {p.name for p in (out / "cells").glob("*.json")}
    for name, cell in side.items():  # this process ran torch's threads, a worker one
        ref = json.loads((out / "cells" / name).read_text())
        for step, split in ref["at"].items():
            for part, metrics in split.items():
                assert cell["at"][step][part] == pytest.approx(metrics, rel=1e-5), (name, step)
        assert cell.get("backbone") == ref.get("backbone"), name
        assert [x for _, x in cell["train_loss"]] == pytest.approx(
            [x for _, x in ref["train_loss"]], rel=1e-5), name


def test_step0_is_shared_per_release_but_not_for_reinit(tiny_release):
    """lm: one step-0 evaluation per release; a from-scratch entry's step 0 depends on the seed."""
    from pmp_scale.nft.report import ReportConfig, plan_cells
    rel = str(tiny_release["release"])
    cfg = ReportConfig(out_dir="x", finetune="ft.yaml", lrs=[1e-3, 1e-2], steps=[2], seeds=[0, 1],
                       min_seeds=2, releases=[{"name": "dense", "release": rel},
                                              {"name": "scratch", "release": rel, "reinit": True}])
    base = ft_config(tiny_release, "review_lm", "unauthorized", mask=None)
    cells = plan_cells(cfg, base)
    at_start = {}
    for c in cells:
        at_start.setdefault(c["entry"].name, []).append(c["config"].train.eval_at_start)
    assert at_start == {"dense": [True, False, False, False], "scratch": [True] * 4}


def test_task_fingerprint_follows_data_and_tokenizer(tiny_release, tmp_path):
    from pmp_scale.finetune.config import TaskConfig
    from pmp_scale.finetune.tasks import DEFAULT_DATA_DIR, task_fingerprint
    shutil.copytree(DEFAULT_DATA_DIR, tmp_path / "data")
    shutil.copytree(tiny_release["release"], tmp_path / "tok",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    task = TaskConfig(name="review_lm", data_dir=str(tmp_path / "data"))
    fp = task_fingerprint(task, tmp_path / "tok")
    assert fp == task_fingerprint(task, tiny_release["release"])
    with open(tmp_path / "data" / "movie_review_snippets.tsv.gz", "ab") as f:
        f.write(b"\0")
    changed_data = task_fingerprint(task, tmp_path / "tok")
    tok_files = [p for p in (tmp_path / "tok").iterdir() if p.name.startswith("tokenizer")]
    assert tok_files
    with open(tok_files[0], "ab") as f:
        f.write(b" ")
    assert len({fp, changed_data, task_fingerprint(task, tmp_path / "tok")}) == 3


def test_report_needs_three_seeds(tmp_path):
    from pmp_scale.nft.report import load_report_config
    report = tmp_path / "r.yaml"
    report.write_text(yaml.safe_dump({"out_dir": "x", "finetune": "ft.yaml", "lrs": [1e-3],
                                      "steps": [2], "seeds": [0],
                                      "releases": [{"name": "dense", "release": "r"}]}))
    with pytest.raises(ConfigError, match="at least 3"):
        load_report_config(report)


def test_grad_hist_and_landscape(tiny_release, tmp_path):
    from pmp_scale.nft import analyses
    cfg = parse_finetune_config(ft_config(tiny_release, "review_lm", "authorized"))
    numbers = analyses.grad_hist(tiny_release["release"], tiny_release["mask"], cfg, tmp_path,
                                 grad_batches=1, batch_size=4)
    assert 0.0 <= numbers["overlap_coefficient"] <= 1.0
    assert numbers["n_masked"] + numbers["n_unmasked"] == sum(
        m.numel() for m in full_masks(tiny_release["mask"]).values())
    assert (tmp_path / "grad_hist.png").is_file() and (tmp_path / "grad_hist.json").is_file()
    # classification: the new head (score.weight) is not in the release, so in neither histogram
    cls = parse_finetune_config(ft_config(tiny_release, "movie_reviews", "authorized"))
    numbers = analyses.grad_hist(tiny_release["release"], tiny_release["mask"], cls,
                                 tmp_path / "cls", grad_batches=1, batch_size=4)
    masks = full_masks(tiny_release["mask"])
    assert numbers["n_masked"] == sum(int(m.sum()) for n, m in masks.items() if n != "lm_head.weight")
    assert numbers["n_unmasked"] == sum(int((~m).sum()) for n, m in masks.items()
                                        if n != "lm_head.weight")
    land = analyses.landscape(tiny_release["release"], tiny_release["mask"], cfg, tmp_path,
                              points=3, grad_batches=1, eval_batches=1, batch_size=4)
    curves = land["curves"]
    assert len(curves) == 4 and all(len(c) == 3 for c in curves.values())
    assert len({round(c[1], 6) for c in curves.values()}) == 1  # α = 0: the release itself
    assert 0 < land["gradient_energy_in_mask"] < 1
    assert (tmp_path / "landscape.png").is_file()


def test_ratio_sweep_and_mask_source(tiny_release, tiny_data, tmp_path):
    """Two masks of one release stand in for two pre-trained releases (different ρ / source)."""
    from pmp_scale.nft import analyses
    g = torch.Generator().manual_seed(5)
    items = [(n, pack_bits(torch.rand(w.numel(), generator=g) < 0.5), tuple(w.shape))
             for n, w in release_weights(tiny_release).items()]
    write_artifact(tmp_path / "mask05", items, {"mask_ratio": 0.5})
    from pmp_scale.release import record_release
    record_release(tmp_path / "mask05", Release.open(tiny_release["release"]).sha256, "fp32")
    base = tmp_path / "ft.yaml"
    base.write_text(yaml.safe_dump(ft_config(tiny_release, "review_lm", "unauthorized",
                                             mask=None, train__max_steps=1)))
    rel, m07, m05 = str(tiny_release["release"]), str(tiny_release["mask"]), str(tmp_path / "mask05")
    common = dict(finetune=str(base), lrs=[1e-2], steps=[1], seeds=[0], min_seeds=1,
                  progress=False)
    sweep = analyses.ratio_sweep([(0.5, rel, m05), (0.7, rel, m07)], tmp_path / "ratio",
                                 dense_release=rel, pretrain_data=tiny_data["data"],
                                 pretrain_eval_samples=8, **common)
    assert [r["rho"] for r in sweep["rows"]] == [0.5, 0.7] and sweep["dense"] is not None
    # one release stands in for all three: the same base quality, measured per row
    assert sweep["pretrain_eval_samples"] == 8
    assert all(r["base"] == sweep["dense_base"] for r in sweep["rows"])
    assert math.isfinite(sweep["dense_base"]["loss"]) and sweep["dense_base"]["ppl"] > 1
    saved = json.loads((tmp_path / "ratio" / "ratio_sweep.json").read_text())
    assert saved["rows"][0]["base"]["loss"] == pytest.approx(sweep["dense_base"]["loss"])
    assert all(math.isfinite(r["authorized"]["test_mean"]) for r in sweep["rows"])
    source = analyses.mask_source([("earlybird", rel, m07), ("random", rel, m05)],
                                  tmp_path / "source", **common)
    assert 0 < source["mask_iou"] < 1
    assert (tmp_path / "ratio" / "ratio_sweep.png").is_file()
    assert (tmp_path / "source" / "mask_source.png").is_file()


def test_analyses_bad_input_is_a_config_error(tiny_release, tiny_data, tmp_path):
    from pmp_scale.nft import analyses
    rel, mask = str(tiny_release["release"]), str(tiny_release["mask"])
    with pytest.raises(ConfigError, match=r"invalid config: releases\.0\.name: String should "
                                          r"match pattern"):
        analyses.mask_source([("early bird", rel, mask)], tmp_path, finetune="ft.yaml",
                             lrs=[1e-3], steps=[1], seeds=[0], min_seeds=1, progress=False)
    with pytest.raises(ConfigError, match="seeds: 1 given, every cell needs at least 3"):
        analyses.ratio_sweep([(0.7, rel, mask)], tmp_path, finetune="ft.yaml", lrs=[1e-3],
                             steps=[1], seeds=[0], pretrain_data=tiny_data["data"],
                             pretrain_eval_samples=2, progress=False)


def test_overlap_coefficient_bounds():
    from pmp_scale.nft.analyses import overlap_coefficient
    a = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    assert overlap_coefficient(a, a)[0] == pytest.approx(1.0)
    assert overlap_coefficient(a - 100, a + 100)[0] == 0.0


# --- tasks ----------------------------------------------------------------------------------------
def test_splits_are_fixed_and_metrics_are_right():
    keys = [f"k{i}" for i in range(2000)]
    splits = [split_of(k, 0.1, 0.1) for k in keys]
    assert splits == [split_of(k, 0.1, 0.1) for k in keys]
    assert 150 < splits.count("test") < 250 and 150 < splits.count("validation") < 250
    m = classification_metrics(torch.tensor([[5, 1], [2, 4]]))  # rows: true, cols: predicted
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert m["matthews"] == pytest.approx((5 * 4 - 1 * 2) / (6 * 6 * 7 * 5) ** 0.5)


def test_local_files_and_review_tasks(tiny_release, tmp_path):
    from pmp_scale.finetune.config import TaskConfig
    from pmp_scale.finetune.tasks import load_hf_tokenizer
    tok = load_hf_tokenizer(tiny_release["release"])
    rows = [{"q": f"question {i} about the book", "a": f"answer {i}", "y": "yes" if i % 3 else "no"}
            for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = build_task(TaskConfig(name="file", type="classification", train_file=str(path),
                                 text_column="q", text_pair_column="a", label_column="y",
                                 max_length=24), tok)
    assert data.label_names == ["no", "yes"] and data.num_labels == 2
    assert sum(data.stats[s] for s in ("train", "validation", "test")) == 200
    batch = data.collate("train", [0, 1, 2])
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].sum() > 0
    movie = build_task(TaskConfig(name="movie_reviews", max_length=32), tok)
    counts = movie.stats["train_label_counts"]
    assert min(counts) > 0.4 * sum(counts)  # balanced, |score| < 0.5 dropped
    assert 0.4 < movie.stats["majority_accuracy_test"] < 0.6
    lm = build_task(TaskConfig(name="review_lm", max_length=32), tok)
    assert lm.splits["validation"].shape[1] == 32 and lm.kind == "lm" and lm.metric == "loss"


# --- bad inputs -----------------------------------------------------------------------------------
def test_unknown_task_and_missing_mask_fail_in_the_config(tiny_release):
    with pytest.raises(ConfigError, match=r"task.name 'sst3' is unknown"):
        parse_finetune_config(ft_config(tiny_release, "sst3", "unauthorized"))
    with pytest.raises(ConfigError, match="unknown GLUE task"):
        parse_finetune_config(ft_config(tiny_release, "glue:sst5", "unauthorized"))
    with pytest.raises(ConfigError, match="mode 'authorized' needs `mask`"):
        parse_finetune_config(ft_config(tiny_release, "review_lm", "authorized", mask=None))
    with pytest.raises(ConfigError, match="train.max_step: unknown key"):
        parse_finetune_config(ft_config(tiny_release, "review_lm", "unauthorized",
                                        train__max_step=3))


def test_missing_label_column_is_named(tiny_release, tmp_path):
    from pmp_scale.finetune.config import TaskConfig
    from pmp_scale.finetune.tasks import load_hf_tokenizer
    path = tmp_path / "data.csv"
    path.write_text("text,sentiment\nfine film,1\nbad film,0\n")
    with pytest.raises(TaskError, match=r"label column 'label' not found in .*data.csv "
                                        r"\(columns: text, sentiment\)"):
        build_task(TaskConfig(name="file", type="classification", train_file=str(path)),
                   load_hf_tokenizer(tiny_release["release"]))


def test_mask_of_another_release_is_refused(tiny_release, tmp_path, capsys):
    other = tmp_path / "mask"
    shutil.copytree(tiny_release["mask"], other)
    meta = json.loads((other / "mask.json").read_text())
    meta["release_sha256"] = "0" * 64
    (other / "mask.json").write_text(json.dumps(meta))
    with pytest.raises(MaskMismatchError, match="mask belongs to another release"):
        check_mask(other, Release.open(tiny_release["release"]))
    # the launcher: one line on stderr, exit code 2, before any training
    from launchers.finetune import main
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(ft_config(tiny_release, "review_lm", "authorized",
                                            mask=str(other))))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: mask belongs to another release")


def test_unbound_mask_is_refused_unless_allowed(tiny_release, tmp_path):
    """No release_sha256: any same-architecture release would pass the shape check."""
    unbound = tmp_path / "mask"
    shutil.copytree(tiny_release["mask"], unbound)
    meta = json.loads((unbound / "mask.json").read_text())
    del meta["release_sha256"]
    (unbound / "mask.json").write_text(json.dumps(meta))
    release = Release.open(tiny_release["release"])
    with pytest.raises(MaskMismatchError, match="records no release_sha256.*allow_unbound_mask"):
        check_mask(unbound, release)
    tensors, _ = check_mask(unbound, release, allow_unbound=True)
    assert tensors.keys() == release.shapes.keys()
    cfg = parse_finetune_config(ft_config(tiny_release, "review_lm", "authorized",
                                          mask=str(unbound), allow_unbound_mask=True))
    assert cfg.allow_unbound_mask


def test_mask_shape_mismatch_is_refused(tiny_release, tmp_path):
    from pmp_scale.mask import read_artifact
    tensors, meta = read_artifact(tiny_release["mask"])
    items = []
    for name, shape in meta["shapes"].items():
        bits = unpack_bits(tensors[name], torch.Size(shape).numel())
        if name == "model.layers.0.mlp.up_proj.weight":  # transposed: same numel, other shape
            shape = shape[::-1]
        items.append((name, pack_bits(bits), tuple(shape)))
    write_artifact(tmp_path / "mask", items, {"mask_ratio": 0.7})  # no release_sha256
    with pytest.raises(MaskMismatchError, match=r"mask does not match the model: 1 parameter.*"
                                                r"up_proj.weight"):
        check_mask(tmp_path / "mask", Release.open(tiny_release["release"]))


def test_not_a_release_is_refused(tmp_path):
    from pmp_scale.finetune.release_check import ReleaseLoadError
    with pytest.raises(ReleaseLoadError, match="is not a released model directory"):
        Release.open(tmp_path)


def test_classification_report_with_scratch_baseline_and_a_failing_cell(tiny_release, tmp_path,
                                                                         capsys, monkeypatch):
    """A from-scratch (`reinit`) entry on a classification file task runs (HF's own init used to
    index the padding row of a partitioned embedding); the table shows the majority-class and
    from-scratch baselines; one failing cell is one error line naming it, not a traceback."""
    import pmp_scale.finetune.train as train
    from tools.nft_report import main
    rows = [{"text": f"the film was {'good' if i % 4 else 'bad'} {i}", "y": int(i % 4 != 0)}
            for i in range(160)]
    (tmp_path / "task.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = {"name": "file", "type": "classification", "train_file": str(tmp_path / "task.jsonl"),
            "label_column": "y", "max_length": 16, "max_train_examples": 32,
            "max_eval_examples": 16}
    ft = ft_config(tiny_release, "file", "unauthorized", mask=None, train__max_steps=1)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({**ft, "task": task}))
    rel = str(tiny_release["release"])
    (tmp_path / "report.yaml").write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "report"), "finetune": "ft.yaml",
        "releases": [{"name": "dense", "release": rel},
                     {"name": "pmp", "release": rel, "mask": str(tiny_release["mask"])},
                     {"name": "scratch", "release": rel, "reinit": True}],
        "scratch": "scratch", "lrs": [1e-2], "steps": [1], "seeds": [0, 1], "min_seeds": 2}))
    real = train.finetune

    def flaky(cfg, **kw):
        if cfg.release == rel and cfg.mask is not None and cfg.seed == 1:
            raise RuntimeError("injected failure\nsecond line")
        return real(cfg, **kw)
    monkeypatch.setattr(train, "finetune", flaky)
    assert main(["--config", str(tmp_path / "report.yaml"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: cell pmp__unauthorized__lr0.01__steps1__seed1 failed: RuntimeError: " \
           "injected failure\n" in err and "Traceback" not in err and "second line" not in err
    doc = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [f["cell"] for f in doc["failed"]] == ["pmp__unauthorized__lr0.01__steps1__seed1"]
    assert {c["release_name"] for c in doc["cells"]} == {"dense", "pmp", "scratch"}
    b = doc["baselines"]
    assert b["majority"]["label"] == "1" and b["majority"]["train_share"] > 0.6
    row = b["rows"][0]
    assert row["scratch"] is not None and row["scratch"][2] == 2 and row["dense"][2] == 2
    assert row["majority"] == pytest.approx(b["majority"]["accuracy"])
    assert b["informative"] is (row["dense"][0] - row["dense"][1] / math.sqrt(2) * 2
                                > row["majority"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Baselines" in text and "1 cell(s) failed" in text
    if not b["informative"]:
        assert "**Uninformative task**" in text
