"""Stage III: release round trip at W=2, mask export and re-slicing, audits of planted leaks.

The checkpoints come from the shared launch (`release_source`: a tied-embedding GPT-2 PMP run;
`dense_resumed`: an untied Llama); every release and audit here is single-process.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import full_masks
from pmp_scale.checkpoint import file_digest
from pmp_scale.mask import read_artifact, write_artifact
from pmp_scale.release.export import merge_mask_slices
from pmp_scale.zero3.layout import read_signature
from pmp_scale.release import (audit_files, record_release, release_checkpoint, release_sha256,
                               release_tensors, resolve_checkpoint)
from pmp_scale.secrecy import audit_release
from tools import audit_release as audit_cli
from tools import export_mask as export_cli
from tools import release as release_cli
from tools import reshard_mask as reshard_cli

# A SentencePiece tokenizer is released as tokenizer.json alone (its exact pipeline, loaded the
# same by transformers 4 and 5), not as tokenizer.model.
RELEASE_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def source(dist_results):
    final = torch.load(dist_results / "release_source_final.pt")
    return {"run": dist_results / "release_source", **final}


@pytest.fixture(scope="module")
def released(source, tmp_path_factory):
    """fp32 release (through the CLI, bound to a copy of the private mask) and a sharded bf16 one."""
    root = tmp_path_factory.mktemp("released")
    private = root / "private_mask"
    shutil.copytree(source["run"] / "private" / "mask", private)
    assert release_cli.main([str(source["run"]), str(root / "fp32"), "--private", str(private)]) == 0
    tag = resolve_checkpoint(source["run"])
    release_checkpoint(tag, root / "bf16", dtype="bf16", max_shard_size="200KB", progress=False)
    return {"fp32": root / "fp32", "bf16": root / "bf16", "private": private, "root": root}


def test_release_equals_trained_params_bit_for_bit(source, released):
    fp32 = load_file(released["fp32"] / "model.safetensors")
    assert fp32.keys() == source["params"].keys()  # tied lm_head saved once, as HF does
    for name, param in source["params"].items():
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], param), name
    bf16 = dict(release_tensors(released["bf16"]))
    assert (released["bf16"] / "model.safetensors.index.json").is_file()
    for name, param in source["params"].items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], param.bfloat16()), name


def test_from_pretrained_logits_match_the_engine(source, released):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(released["fp32"], local_files_only=True).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=source["input_ids"]).logits
    assert (logits - source["logits"]).abs().max().item() <= 1e-5
    AutoTokenizer.from_pretrained(released["fp32"], local_files_only=True)


def test_release_is_mask_free_and_audits_clean(released, capsys):
    assert {p.name for p in released["fp32"].iterdir()} == RELEASE_FILES
    assert not list(released["root"].glob(".*tmp-*"))
    config = json.loads((released["fp32"] / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    assert audit_files(released["bf16"]) == []
    assert audit_cli.main([str(released["fp32"]), "--private", str(released["private"])]) == 0
    out = capsys.readouterr().out
    assert "audit passed" in out and "greedy:" in out and "complement vs θ(0) checked" in out
    assert "exact channels (bits, constants) from the release's own statistics: none" in out
    assert "attack seed_guess (init-seed guessing): AUC" in out  # scored, under the audit rule


def test_audit_detects_a_mask_artifact_of_another_release(released):
    audit = audit_release(released["bf16"], released["private"], load=False)
    assert any(p.startswith("sha mismatch") for p in audit.problems), audit.problems


def test_audit_detects_a_moved_complement_element(released, tmp_path):
    """A frozen element off θ(0) fails the exact check, even with a matching sha256."""
    release, private = tmp_path / "release", tmp_path / "private"
    shutil.copytree(released["fp32"], release)
    shutil.copytree(released["private"], private)
    weights = load_file(release / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    frozen = (~full_masks(private)[name].flatten()).nonzero()[0].item()
    weights[name].view(-1)[frozen] += 1e-3
    save_file(weights, str(release / "model.safetensors"), metadata={"format": "pt"})
    record_release(private, release_sha256(release), "fp32")
    problems = audit_release(release, private, load=False).problems
    assert len(problems) == 1 and problems[0].startswith(f"{name}: 1 of "), problems


def _rewrite_weights(release, extra=None, metadata=None):
    weights = load_file(release / "model.safetensors")
    save_file({**weights, **(extra or {})}, str(release / "model.safetensors"),
              metadata=metadata or {"format": "pt"})


def _set_config(release, key, value):
    config = json.loads((release / "config.json").read_text())
    config[key] = value
    (release / "config.json").write_text(json.dumps(config))


PLANTS = {
    "mask tensor": (lambda r: _rewrite_weights(
        r, {"transformer.h.0.mlp.c_fc.mask": torch.ones(8, dtype=torch.uint8)}), "forbidden name"),
    "optimizer state": (lambda r: _rewrite_weights(
        r, {"transformer.wte.weight.exp_avg": torch.zeros(512, 64)}), "forbidden name"),
    "pmp config key": (lambda r: _set_config(r, "pmp", {"mask_ratio": 0.5}), "key 'pmp'"),
    "pickle file": (lambda r: torch.save({}, r / "training_args.bin"), "pickle file"),
    "seed in metadata": (lambda r: _rewrite_weights(r, metadata={"format": "pt", "seed": "7"}),
                         "metadata"),
    "rng state file": (lambda r: (r / "rng_state.json").write_text("{}"), "forbidden file name"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_audit_fails_on_each_planted_item(released, tmp_path, plant, capsys):
    release = tmp_path / "release"
    shutil.copytree(released["fp32"], release)
    make, expected = PLANTS[plant]
    make(release)
    assert audit_cli.main([str(release)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any(expected in line for line in fails), fails


def _secret_seed(source) -> int:
    """The run drew its init seed (no `seed` in its config); only its private mask.json has it."""
    return json.loads((source["run"] / "private" / "mask" / "mask.json").read_text())["init_seed"]


def test_mask_export_and_reshard_round_trip(source, released, tmp_path):
    """Export from the 2-rank shards == the trainer's artifact (bytes, θ(0), metadata); re-sliced
    to W = 1, 3, 4 and merged back, byte for byte; the complement of the trained weights sits at
    θ(0)."""
    exported = tmp_path / "exported"
    assert export_cli.main([str(source["run"]), str(exported), "--init"]) == 0
    trained = source["run"] / "private" / "mask"
    assert (exported / "mask.safetensors").read_bytes() == (trained / "mask.safetensors").read_bytes()
    init, trained_init = load_file(exported / "init.safetensors"), load_file(trained / "init.safetensors")
    assert init.keys() == trained_init.keys()
    assert all(torch.equal(init[k], trained_init[k]) for k in init)
    _, meta = read_artifact(exported)
    assert meta["world_size"] == 2 and meta["init_seed"] == _secret_seed(source)
    _, trained_meta = read_artifact(trained)  # one writer, one metadata (+ where it came from)
    later = {"source", "release_sha256", "release_dtype"}  # export's origin; the release binds
    assert {k: v for k, v in meta.items() if k not in later} == \
        {k: v for k, v in trained_meta.items() if k not in later}
    masks = full_masks(exported)
    for name, param in source["params"].items():
        frozen = ~masks[name]
        assert torch.equal(param[frozen], init[name][frozen]), name
    for world in (1, 3, 4):
        out = tmp_path / f"w{world}"
        assert reshard_cli.main([str(exported), "--world-size", str(world), "--out", str(out)]) == 0
        layout = json.loads((out / "layout.json").read_text())
        rank_bits = [load_file(out / f"rank{r}.safetensors") for r in range(world)]
        shapes = {n: tuple(p["shape"]) for n, p in layout["params"].items()}
        write_artifact(tmp_path / f"merged{world}", merge_mask_slices(rank_bits, shapes), {})
        assert (tmp_path / f"merged{world}" / "mask.safetensors").read_bytes() == \
            (exported / "mask.safetensors").read_bytes()
    # an existing output is refused unless --overwrite, which swaps it whole
    out = tmp_path / "w4"
    assert reshard_cli.main([str(exported), "--world-size", "2", "--out", str(out)]) == 2
    assert len(list(out.glob("rank*.safetensors"))) == 4
    assert reshard_cli.main([str(exported), "--world-size", "2", "--out", str(out),
                             "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layout.json", "rank0.safetensors",
                                                     "rank1.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary dirs left beside it


def test_dense_llama_release_and_tags(dist_results, tmp_path):
    """An untied Llama checkpoint at its latest tag equals the run's final weights; --tag picks another."""
    run = dist_results / "dense_resumed"
    assert release_cli.main([str(run), str(tmp_path / "latest")]) == 0
    final = torch.load(dist_results / "dense_resumed_params.pt")
    weights = load_file(tmp_path / "latest" / "model.safetensors")
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[k], final[k]) for k in final)
    assert release_cli.main([str(run / "checkpoints"), str(tmp_path / "s3"), "--tag",
                             "step00000003"]) == 0
    assert not torch.equal(load_file(tmp_path / "s3" / "model.safetensors")["lm_head.weight"],
                           final["lm_head.weight"])


def test_bf16_run_releases_and_exports(dist_results, tmp_path):
    """A bf16 run (DeepSpeed names its optimizer files bf16_zero_pp_rank_*): the fp32 release is
    the fp32 master, cut here from the optimizer files by the mask's layout table rather than by
    zero_to_fp32's arithmetic; its bf16 cast, and the bf16 release, are the trained bf16 params."""
    run = dist_results / "pmp_frozen_bf16"
    tag = resolve_checkpoint(run)
    assert release_cli.main([str(run), str(tmp_path / "fp32")]) == 0
    assert release_cli.main([str(run), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    trained = torch.load(dist_results / "pmp_frozen_bf16.pt", weights_only=False)["after"]
    masters = [torch.load(tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", mmap=True,
                          weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
               for r in range(2)]
    layouts = [read_signature(torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                                         mmap=True, weights_only=False)
                              ["pmp_components"]["pmp"]["mask"]["signature"]) for r in range(2)]
    assert fp32.keys() == bf16.keys() == trained.keys()
    for name, param in trained.items():
        parts = []
        for groups, layout in zip(masters, layouts):
            row = layout[name]
            parts.append(groups[row.sub_group][row.offset:row.offset + row.length])
        master = torch.cat(parts).reshape(param.shape)
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], master), name
        assert param.dtype == torch.bfloat16 and torch.equal(fp32[name].bfloat16(), param), name
        assert torch.equal(bf16[name], param), name
    assert not all(torch.equal(t, t.bfloat16().float()) for t in fp32.values())  # not bf16 values
    assert export_cli.main([str(run), str(tmp_path / "mask")]) == 0
    assert (tmp_path / "mask" / "mask.safetensors").read_bytes() == \
        (run / "private" / "mask" / "mask.safetensors").read_bytes()


def _copy_latest(run, tmp_path):
    """The run's latest tag copied as a one-tag run at tmp_path/run; returns the tag dir."""
    tag = resolve_checkpoint(run)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(tag, ckpts / tag.name)
    (ckpts / "latest").write_text(tag.name)
    return ckpts / tag.name


def test_incomplete_or_corrupt_tag_is_refused(source, tmp_path, capsys):
    """The tools resolve a tag only if it has its completion marker and every file matches its
    recorded checksum; --unverified releases a checkpoint without a marker."""
    run, out = tmp_path / "run", tmp_path / "out"
    tag = _copy_latest(source["run"], tmp_path)
    (tag / "complete.json").unlink()
    assert release_cli.main([str(run), str(out)]) == 2
    assert "incomplete (no completion marker" in _error(capsys)
    assert export_cli.main([str(run), str(tmp_path / "mask")]) == 2
    assert "incomplete (no completion marker" in _error(capsys)
    assert not out.exists() and not (tmp_path / "mask").exists()
    assert release_cli.main([str(run), str(out), "--unverified"]) == 0
    capsys.readouterr()
    shutil.rmtree(run)
    tag = _copy_latest(source["run"], tmp_path)
    blob = bytearray((tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(bytes(blob))
    for cli, dest in ((release_cli, tmp_path / "out2"), (export_cli, tmp_path / "mask")):
        assert cli.main([str(run), str(dest)]) == 2
        assert "zero_pp_rank_1_mp_rank_00_model_states.pt is corrupt (checksum mismatch)" in \
            _error(capsys)
        assert not dest.exists()


def test_export_records_the_runs_pmp_settings(source, tmp_path):
    """mask.json carries the PMP settings the tag's descriptor records (its "pmp" dict)."""
    tag = _copy_latest(source["run"], tmp_path)
    settings = {"mask_ratio": 0.5, "mask_source": "random", "score": "step",
                "topk_scope": "global", "exclude": ["*.ln_*"], "rewind": "init",
                "complement": "frozen"}
    descriptor = json.loads((tag / "pmp_scale.json").read_text())
    (tag / "pmp_scale.json").write_text(json.dumps({**descriptor, "pmp": settings}))
    marker = json.loads((tag / "complete.json").read_text())
    marker["files"]["pmp_scale.json"] = file_digest(tag / "pmp_scale.json")
    (tag / "complete.json").write_text(json.dumps(marker))
    assert export_cli.main([str(tmp_path / "run"), str(tmp_path / "mask")]) == 0
    _, meta = read_artifact(tmp_path / "mask")
    assert {k: meta.get(k) for k in settings} == settings
    assert meta["world_size"] == 2 and meta["init_seed"] == _secret_seed(source)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_give_one_clear_line(source, released, dist_results, tmp_path, capsys):
    assert release_cli.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in _error(capsys)
    (tmp_path / "junk").mkdir()
    torch.save({}, tmp_path / "junk" / "mp_rank_00_model_states.pt")
    assert release_cli.main([str(tmp_path / "junk"), str(tmp_path / "out")]) == 2
    assert "is not a ZeRO-3 checkpoint" in _error(capsys)
    before = (released["fp32"] / "model.safetensors").read_bytes()
    assert release_cli.main([str(source["run"]), str(released["fp32"])]) == 2
    assert "is not empty; pass --overwrite" in _error(capsys)
    other = dist_results / "pmp_frozen_fp32" / "private" / "mask"  # a Llama run's artifact
    assert release_cli.main([str(source["run"]), str(released["fp32"]), "--overwrite",
                             "--private", str(other)]) == 2
    assert "does not describe the checkpoint" in _error(capsys)
    assert (released["fp32"] / "model.safetensors").read_bytes() == before  # untouched
    assert not list(released["root"].glob(".*tmp-*"))
    assert export_cli.main([str(dist_results / "dense_resumed"), str(tmp_path / "m")]) == 2
    assert "has no PMP mask" in _error(capsys)
