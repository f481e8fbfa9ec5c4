"""The entry point as users run it, and the slow big-preset builds."""
from __future__ import annotations

import json

import pytest

from pmp_scale.telemetry import read_metrics


def test_pretrain_launcher_end_to_end(launcher_run):
    proc, run_dir = launcher_run["proc"], launcher_run["run_dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
    assert all(m["train/lr"] <= 2e-3 for m in metrics if "train/lr" in m)  # --set applied
    vals = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000004"
    assert not (ckpts / "step00000002").exists()  # keep: 1
    tag = ckpts / "step00000004"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert json.loads((tag / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert "step 4 | loss" in proc.stdout + proc.stderr
    # a finished run leaves no DeepSpeed all-reduce segment (67 MB a rank) in /dev/shm and no
    # streaming filelock in the temporary directory (both libraries leave theirs)
    assert launcher_run["left"] == [], launcher_run["left"]


def test_estimate_memory_prints_per_rank_table(capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.estimate_memory import main
    assert main(["llama-7b", "--gpus-per-node", "8", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "6.738 B" in out and "16 = 2 node(s) x 8" in out
    assert "PMP mask / rank (packed)" in out


@pytest.mark.slow
def test_big_presets_build_partitioned(tmp_path, tiny_data):
    from helpers import run_scenarios
    out = run_scenarios(tmp_path, tiny_data, ["big_presets"], 2)
    ranks = [json.loads((out / f"big_presets_rank{r}.json").read_text()) for r in (0, 1)]
    expected_total = {"llama-1.1b": 1_100_048_384, "llama-7b": 6_738_415_616}
    for preset, total in expected_total.items():
        params = ranks[0][preset]["params"]
        assert sum(n for n, _ in params.values()) == total
        for name, (numel, local) in params.items():
            assert local == -(-numel // 2), name
    # a rank never held the 7B model: its bf16 weights alone would be 13.5 GB
    assert ranks[0]["llama-7b"]["rss_growth"] < 0.75 * 2 * expected_total["llama-7b"]
