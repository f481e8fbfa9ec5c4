"""tools/study.py: bad input fails before any run with one line; a tiny study killed with
SIGKILL mid-way and rerun reuses every finished run, release and grid cell, and completes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, write_study

sys.path.insert(0, str(REPO))

def study_cmd(path: Path, *extra) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "study.py"), "--config", str(path), "--quiet",
            *extra]


def run_study(path: Path, *extra, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(study_cmd(path, *extra), capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("over, message", [
    ({"presets": ["llama-huge"]}, "presets: 'llama-huge' is unknown"),
    ({"variants": [{"mask_ratio": [1.5]}]}, "mask_ratio 1.5 is impossible"),
    ({"pretrain_seeds": [1, 1]}, "pretrain_seeds [1, 1]: a seed is repeated"),
    ({"presets": ["gpt2-tiny"], "controls": {"reparam_alpha": 10}},
     "the reparameterised control is defined for Llama presets only, not 'gpt2-tiny'"),
    ({"data": {"path": "/nonexistent/mds", "tokenizer": "/nonexistent/t.model"}},
     "data.path /nonexistent/mds is not prepared data"),
    ({"finetune__tasks": [{"name": "file", "type": "classification",
                           "train_file": "TASKFILE", "label_column": "stars"}]},
     "task task: label column 'stars' not found"),
])
def test_bad_input_fails_before_any_run(tiny_data, tmp_path, over, message):
    from pmp_scale.study import StudyError, prepare
    if "finetune__tasks" in over:
        (tmp_path / "task.csv").write_text("text,label\ngood,1\nbad,0\n")
        over["finetune__tasks"][0]["train_file"] = str(tmp_path / "task.csv")
    with pytest.raises(StudyError) as err:
        prepare(write_study(tmp_path, tiny_data, **over))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_exit_code_2(tiny_data, tmp_path):
    proc = run_study(write_study(tmp_path, tiny_data, presets=["llama-huge"]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: presets: 'llama-huge' is unknown")
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_its_time(tiny_data, tmp_path):
    proc = run_study(write_study(tmp_path, tiny_data), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama-tiny__r0.5_random_project" in proc.stdout and "estimated time:" in proc.stdout
    assert "8 cells each" in proc.stdout  # (dense + scratch + 2 modes) x 2 seeds
    assert not (tmp_path / "out").exists()


@pytest.mark.extended  # three end-to-end study runs; the default tier keeps the reuse rule below
@pytest.mark.timeout(3600)
def test_sigkill_mid_study_then_rerun_reuses_finished_work(tmp_path):
    """The GPU check's study at CPU size (`tools/gpu_check.sh --tiny --stage study`: data
    prepared, dense + one PMP run, grid, attacks, claims), killed with SIGKILL right after the
    dense run finished, then run again (it completes, reusing the dense run untouched) and a
    third time (nothing redone, no cell rewritten)."""
    out = tmp_path / "work" / "study"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable,
           "GPU_CHECK_WORK": str(tmp_path / "work")}
    cmd = ["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "check"), "--tiny",
           "--stage", "study"]
    dense = out / "runs" / "gpt2-tiny__dense" / "study_done.json"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not dense.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # the PMP run's launch is under way
    os.killpg(proc.pid, signal.SIGKILL)  # the study, its launcher and every rank
    proc.wait()
    assert dense.exists() and not (out / "study.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in dense.parent.rglob("*") if p.is_file()}

    def again():
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "| claim | where | measured (effect, 95% CI, test) |" in done.stdout
        return json.loads((out / "study.json").read_text())
    doc = again()
    assert "pre-training gpt2-tiny__dense" in doc["work"]["reused"]
    assert "pre-training gpt2-tiny__r0.5_random_frozen" in doc["work"]["done"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # not one file rewritten
    assert {c["claim"] for c in doc["claims"]} >= {"base preserved", "mask secrecy",
                                                   "unauthorized gain cut (vs dense)",
                                                   "authorized ≥ unauthorized"}
    assert doc["variants"][0]["gain_cut"]["n_a"] == 1  # one dense release: untestable
    assert doc["curvature"]["gpt2-tiny / dense"]["mask_from"] == "r0.5_random_frozen"
    assert (out / "study.md").read_text().count("| base preserved |") == 1
    cells = {p: p.stat().st_mtime_ns for p in out.rglob("cells/*.json")}
    assert len(cells) == 6  # (dense + 2 PMP modes) x 2 seeds
    doc = again()  # everything finished: all reused, nothing redone
    # runs, releases, grid, secrecy, curvature of both releases
    assert doc["work"]["done"] == [] and len(doc["work"]["reused"]) == 2 + 2 + 1 + 1 + 2
    assert {p: p.stat().st_mtime_ns for p in cells} == cells


@pytest.mark.timeout(60)
def test_claim_verdicts_follow_the_stated_rules():
    """Releases are the unit (paired t on release means, Holm over the tested rows); base
    within tolerance; ρ trade-off needs both orderings; one release per side is untestable."""
    from types import SimpleNamespace
    from pmp_scale.study.claims import claims
    from pmp_scale.study.stats import compare
    cfg = SimpleNamespace(claims=SimpleNamespace(base_tolerance=0.05, secrecy_auc=0.55))
    dense = {"dense__s0": 1.00, "dense__s1": 1.10, "dense__s2": 0.95}

    def row(rho, src, cost, gains, auc=0.5):
        names = [f"r{rho}_{src}__s{i}" for i in range(len(gains))]
        g = dict(zip(names, gains))
        pair = dict(zip(sorted(dense), names))
        return {"preset": "p", "task": "t", "variant": f"r{rho}_{src}", "releases": names,
                "seeds": list(range(len(gains))), "mask_ratio": rho, "mask_source": src,
                "complement": "frozen", "score": "step", "label": None,
                "base_loss": 5 * (1 + cost), "dense_loss": 5.0, "base_cost": cost,
                "gains": g, "gain_cut": compare(dense, g, pair), "body_cut": None,
                "recovery": compare({n: 0.01 * (i - 1) for i, n in enumerate(names)}),
                "max_auc": auc}
    rows = [row(0.5, "earlybird", 0.08, [0.50, 0.61, 0.44], auc=0.7),
            row(0.7, "earlybird", 0.02, [0.90, 1.01, 0.84]),
            row(0.7, "random", 0.03, [0.80, 0.905, 0.745])]
    aa = [{"control": "negative (A/A)", "where": "p / t", "gap": -0.1}]
    out = claims(rows, cfg, aa)
    table = {(c["claim"], c["where"]): c for c in out}
    assert table[("base preserved", "p / r0.5_earlybird")]["verdict"] == "contradicted"  # +8 %
    assert table[("base preserved", "p / r0.7_earlybird")]["verdict"] == "supported"
    cut = table[("unauthorized gain cut (vs dense)", "p / t / r0.5_earlybird")]
    assert cut["test"]["test"] == "paired t" and cut["test"]["df"] == 2
    assert cut["verdict"] == "supported" and cut["noise"] == 0.1
    assert "95% CI" in cut["value"] and "Holm p" in cut["value"]
    assert table[("authorized ≥ unauthorized", "p / t / r0.5_earlybird")]["verdict"] \
        == "inconclusive"  # mean 0 over releases
    eb = table[("early-bird better than random", "p / t / ρ 0.7 frozen")]
    assert eb["verdict"] == "contradicted"  # random's gain is lower: it cuts more
    trade = [c for c in out if c["claim"].startswith("ρ trade-off")]
    assert [c["verdict"] for c in trade] == ["supported"]  # larger cut, larger cost at small ρ
    tested = [c for c in out if "test" in c and c["test"]["test"]]
    assert all(c["test"]["p_adj"] >= c["test"]["p"] for c in tested)
    assert table[("mask secrecy", "p / r0.5_earlybird")]["verdict"] == "contradicted"
    rows[0]["base_cost"] = 0.0  # smaller ρ cheaper than the larger: the trade-off is not there
    trade = [c["verdict"] for c in claims(rows, cfg) if c["claim"].startswith("ρ trade-off")]
    assert trade == ["contradicted"]
    one = row(0.7, "random", 0.0, [0.5])  # one release: inconclusive whatever its value
    assert claims([one], cfg)[1]["verdict"].startswith("inconclusive")


def test_a_finished_run_is_reused_only_with_its_own_settings(tiny_data, tmp_path):
    """Changing a study's settings under the same out_dir must not silently reuse old runs."""
    from pmp_scale.study import StudyError, prepare
    from pmp_scale.study.run import Ledger, pretrain, write_json
    cfg, base_dir, plan = prepare(write_study(tmp_path, tiny_data))
    run = plan.runs[0]
    write_json(run.run_dir / "study_done.json", {"name": run.name, "sets": run.sets})
    ledger = Ledger()
    pretrain(cfg, base_dir, plan, run, ledger)
    assert ledger.reused == [f"pre-training {run.name}"]
    write_json(run.run_dir / "study_done.json", {"name": run.name,
                                                 "sets": [*run.sets[:-1], "pmp.enabled=true"]})
    with pytest.raises(StudyError, match=f"run {run.name} finished with other settings"):
        pretrain(cfg, base_dir, plan, run, ledger)
