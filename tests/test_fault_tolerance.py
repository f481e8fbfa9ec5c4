"""Crashes, preemption, corruption and bad numerics on real 2-rank ZeRO-3 PMP runs (CPU ranks)."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO, full_masks, launch_scenarios, run_distributed

# The fixture adds four 2-rank launches to the session's four; the extended chain six more.
pytestmark = pytest.mark.timeout(3600)

# (the FaultPlan spec, where it strikes) — the chain's run is killed at each point in turn, resumed each time.
KILLS = [
    ("rank1:step:3", "after step 3, before its checkpoint"),
    ("rank0:save_files:4", "inside checkpoint writing: DeepSpeed files on disk, no marker"),
    ("rank1:backward:5", "mid-step: after backward, before the optimizer step"),
    ("rank0:save_marker:8", "inside checkpoint writing: marker written, `latest` not moved"),
    ("rank1:save_files:10", "inside checkpoint writing, in Stage II"),
]
# The step each launch of the chain resumes from (0: fresh; the last is the uninterrupted launch):
# the newest tag that verifies. Tag 4 of launch 2 has no marker, so launch 3 starts from 2 again;
# tag 8 has its marker although `latest` never moved to it; tag 10 has no marker.
RESUMED_FROM = [0, 2, 2, 4, 8, 8]
# The default tier kills once, inside checkpoint writing (tag 4 on disk without its marker): the
# relaunch resumes from tag 2. The extended tier kills the chain at every point above.
ONE_KILL, ONE_KILL_RESUMED_FROM = KILLS[1], [0, 2]


def _corrupt(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def _kill_chain(out, tiny_data, kills, then=()) -> tuple[list[int], list[int]]:
    """Launch the chain's run once per kill, then once to the end (with `then` scenarios):
    (each killed launch's exit code, the first step each launch logged)."""
    chain_log = out / "fault_chain" / "metrics.jsonl"

    def logged() -> int:  # metrics lines so far: where the next launch's records begin
        return len(chain_log.read_text().splitlines()) if chain_log.exists() else 0
    outcomes, starts = [], []
    for spec, _ in kills:
        starts.append(logged())
        outcomes.append(launch_scenarios(out, tiny_data, ["fault_chain"], 2, fault=spec).returncode)
    starts.append(logged())
    final = launch_scenarios(out, tiny_data, ["fault_chain", *then], 2)
    assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    records = chain_log.read_text().splitlines()
    return outcomes, [json.loads(records[i])["step"] for i in starts]


@pytest.fixture(scope="module")
def fault_results(dist_results, tiny_data):
    """The session's launches ran the reference run, the NaN runs, the runs to corrupt and the
    elastic run's first half (FIRST) and its W=1 resume (SINGLE), into `dist_results`; here the
    launches that need a fault plan or must fail."""
    out = dist_results
    sigterm = launch_scenarios(out, tiny_data, ["sigterm_run"], 2, fault="rank1:step:5:TERM")
    ckpts = out / "sigterm" / "checkpoints"
    marker = ckpts / "step00000005" / "complete.json"
    sigterm_ckpt = {"latest": (ckpts / "latest").read_text() if (ckpts / "latest").exists() else None,
                    "marker": json.loads(marker.read_text()) if marker.exists() else None}
    enospc = launch_scenarios(out, tiny_data, ["enospc_in_torch_save"], 2)
    # plant corruption: a mask-carrying per-rank file of the newest tag, and of the only tag
    _corrupt(out / "corrupt_two/checkpoints/step00000004/zero_pp_rank_1_mp_rank_00_model_states.pt")
    _corrupt(out / "corrupt_one/checkpoints/step00000002/zero_pp_rank_0_mp_rank_00_model_states.pt")
    # one kill, then the launch that finishes the chain also resumes sigterm and the corrupt runs
    kills, first_steps = _kill_chain(out, tiny_data, [ONE_KILL],
                                     then=["sigterm_run", "corrupt_resume"])
    return {"out": out, "kills": kills, "sigterm": sigterm, "sigterm_ckpt": sigterm_ckpt,
            "enospc": enospc, "chain_first_steps": first_steps}


def _load(results, name):
    return torch.load(results["out"] / name, weights_only=False)


def _assert_chain_equals_reference(ref_out, chain_out):
    """The killed-and-resumed chain ends bit-exact with the uninterrupted run: every loss, every
    weight, the private mask."""
    from pmp_scale.mask.artifact import read_artifact
    ref = torch.load(ref_out / "fault_ref_final.pt", weights_only=False)
    chain = torch.load(chain_out / "fault_chain_final.pt", weights_only=False)
    assert sorted(ref["losses"]) == list(range(1, 13)) == sorted(chain["losses"])
    for step, loss in ref["losses"].items():
        assert chain["losses"][step] == loss, f"step {step}"
    for name, value in ref["params"].items():
        assert torch.equal(chain["params"][name], value), name
    a, b = (read_artifact(out / run / "private" / "mask")[0]
            for out, run in ((ref_out, "fault_ref"), (chain_out, "fault_chain")))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_exact(fault_results):
    assert all(code != 0 for code in fault_results["kills"]), fault_results["kills"]
    # Where each launch resumed, from metrics.jsonl (the Trainer records no `resumed_from`): a
    # launch's first record is step 0 (a fresh run's val loss) or the step after its resume.
    resumed = [max(step - 1, 0) for step in fault_results["chain_first_steps"]]
    assert resumed == ONE_KILL_RESUMED_FROM, fault_results["chain_first_steps"]
    _assert_chain_equals_reference(fault_results["out"], fault_results["out"])


@pytest.mark.extended
def test_sigkill_at_five_points_then_resume_is_bit_exact(fault_results, tiny_data, tmp_path):
    kills, first_steps = _kill_chain(tmp_path, tiny_data, KILLS)
    assert all(code != 0 for code in kills), kills
    assert [max(step - 1, 0) for step in first_steps] == RESUMED_FROM, first_steps
    _assert_chain_equals_reference(fault_results["out"], tmp_path)


def test_sigterm_checkpoints_and_exits_zero_then_resumes_exactly(fault_results):
    proc = fault_results["sigterm"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exits successfully" in proc.stdout + proc.stderr  # both ranks: exit code 0
    assert (fault_results["out"] / "sigterm_stopped_at_5").exists()
    ckpt = fault_results["sigterm_ckpt"]
    assert ckpt["marker"]["step"] == 5 and ckpt["latest"] == "step00000005"
    ref, resumed = (_load(fault_results, f"{r}_final.pt") for r in ("fault_ref", "sigterm"))
    assert resumed["losses"] == ref["losses"]
    assert all(torch.equal(resumed["params"][n], v) for n, v in ref["params"].items())


def test_nonfinite_steps_are_skipped_then_stop_with_checkpoint(fault_results):
    r = _load(fault_results, "nonfinite.pt")
    assert r["skipped"] == 2
    snaps = r["skip_snapshots"]
    for name, value in snaps[2].items():  # steps 3 and 4 changed nothing
        assert torch.equal(snaps[4][name], value), name
    assert any(not torch.equal(snaps[5][n], v) for n, v in snaps[4].items())  # training went on
    # discovery counts applied steps only: the two skipped ones lengthen Stage I by two
    assert sorted(r["skip_losses"]) == list(range(1, 15))
    assert r["stop_error"].startswith("NonFiniteError: training stopped: non-finite loss or "
                                      "gradient in 2 consecutive steps up to step 4")
    ckpt = fault_results["out"] / "nan_stop" / "checkpoints" / "step00000004"
    assert (ckpt / "complete.json").is_file()
    stop = r["stop_snapshots"]
    assert all(torch.equal(stop[4][n], v) for n, v in stop[2].items())


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(fault_results):
    r = _load(fault_results, "corrupt_resume.pt")["corrupt_two"]
    assert r["step"] == 2
    assert any("step00000004 skipped: file zero_pp_rank_1_mp_rank_00_model_states.pt is corrupt"
               in w for w in r["warnings"]), r["warnings"]
    # the older checkpoint was not touched by the failed attempt
    assert (fault_results["out"] / "corrupt_two/checkpoints/step00000002/complete.json").is_file()


def test_only_checkpoint_corrupt_is_refused(fault_results):
    r = _load(fault_results, "corrupt_resume.pt")["corrupt_one"]
    assert r["error"].startswith("CheckpointError: no checkpoint in")
    assert "step00000002: file zero_pp_rank_0_mp_rank_00_model_states.pt is corrupt" in r["error"]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(fault_results):
    """Rank 1's torch.save fails inside DeepSpeed's save (a full disk raises RuntimeError there):
    every rank stops with the same one line, rank 1 naming itself; nothing older is damaged."""
    proc = fault_results["enospc"]
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-4000:]
    for prefix in ("error: ", "error (rank 1): "):
        line = next((l for l in text.splitlines()
                     if l.startswith(prefix + "could not write checkpoint")), None)
        assert line is not None, (prefix, text[-4000:])
        assert "rank 1: torch.save failed, is the disk full?" in line
        assert "newest complete checkpoint (step00000004) is intact" in line
    assert "Traceback" not in text
    ckpts = fault_results["out"] / "enospc" / "checkpoints"
    assert not (ckpts / "step00000006").exists()
    assert _load(fault_results, "corrupt_resume.pt")["enospc"]["step"] == 4


def test_errors_print_on_every_rank_once_the_process_group_is_up(monkeypatch, capsys):
    """Before: checks every rank makes alike, rank 0 speaks. After: each rank that fails says so."""
    import torch.distributed as dist
    from pmp_scale.checkpoint import CheckpointError
    from pmp_scale.cli import fail_cleanly

    @fail_cleanly
    def main():
        raise CheckpointError("shard unreadable")
    monkeypatch.setenv("RANK", "1")
    assert main() == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert main() == 2 and capsys.readouterr().err == "error (rank 1): shard unreadable\n"
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert main() == 2 and capsys.readouterr().err == "error: shard unreadable\n"


def test_fault_points_are_no_ops_unless_a_plan_is_handed_in(tmp_path):
    """Production code is handed a `Faults` (a no-op by default); a `FaultPlan` strikes only
    its own rank at its own point."""
    import errno
    from pmp_scale.checkpoint import Checkpointer
    from pmp_scale.faults import FaultPlan, Faults
    assert type(Checkpointer(None, tmp_path, keep=1, components={}, fingerprint={}).faults) \
        is Faults
    spec = "rank1:save_files:4:ENOSPC"
    FaultPlan(spec, rank=0).point("save_files:4")  # another rank's
    plan = FaultPlan(spec, rank=1)
    plan.point("save_files:2")  # another point
    with pytest.raises(OSError) as err:
        plan.point("save_files:4")
    assert err.value.errno == errno.ENOSPC


def _verify_each(rank, world, root):
    from pmp_scale.checkpoint import CheckpointError, Checkpointer
    checkpointer = Checkpointer(None, root, keep=2, components={}, fingerprint={})
    out = {}
    for tag in ("step00000002", "step00000004", "step00000006", "step00000008"):
        try:
            out[tag] = checkpointer.verified(tag)
        except CheckpointError as err:
            out[tag] = str(err)
    return out


def test_an_explicitly_named_tag_is_verified(tmp_path):
    """`--resume TAG` gets the checks `auto` makes: every rank hashes its own files and all
    refuse together, naming the problem (here rank 1's file is the corrupt one)."""
    from pmp_scale.checkpoint import MARKER, file_digest
    for step in (2, 4, 6):
        tag = tmp_path / f"step{step:08d}"
        tag.mkdir()
        for r in range(2):
            (tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(bytes([r, step]) * 64)
        if step != 4:  # step 4: interrupted before its marker
            files = {f.name: file_digest(f) for f in tag.iterdir()}
            (tag / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": files}))
    (tmp_path / "step00000006" / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"x")
    for result in run_distributed(_verify_each, 2, tmp_path):
        assert result["step00000002"] == "step00000002"
        assert "step00000004 cannot be resumed from: incomplete" in result["step00000004"]
        assert result["step00000006"].endswith("cannot be resumed from: file zero_pp_rank_1_mp_"
                                               "rank_00_model_states.pt is corrupt (checksum "
                                               "mismatch); pick another tag or --resume auto")
        assert "step00000008 cannot be resumed from: it does not exist" in result["step00000008"]


_PREEMPTION = """
import os, signal, sys, time
from pmp_scale.preemption import Preemption
p = Preemption(grace_s=1.0)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the launcher's forwarded copy: ignored
time.sleep(0.2)
p.close()  # checkpoint written: the watchdog is cancelled
time.sleep(1.5)
print("survived", p._flag, flush=True)
Preemption(grace_s=0.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not ended by the grace timer")
"""


def test_preemption_ignores_repeated_signals_and_close_cancels_the_watchdog():
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _PREEMPTION], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout == "survived True\n", proc.stdout + proc.stderr
    assert proc.returncode == 128 + 15  # the grace timer still ends a stuck process


@pytest.mark.parametrize("world", [1, pytest.param(4, marks=pytest.mark.extended)])
def test_elastic_resume_from_2_ranks(fault_results, tiny_data, world):
    """2 -> 1 and 2 -> 4: training continues within noise; the complement is still θ(0)."""
    from pmp_scale.mask.artifact import read_artifact
    if world != 1:  # the fixture resumes at W=1; the other sizes are the extended tier's
        proc = launch_scenarios(fault_results["out"], tiny_data, ["elastic_resume"], world)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ref = _load(fault_results, "fault_ref_final.pt")
    run = _load(fault_results, f"elastic_w{world}_final.pt")
    assert sorted(run["losses"]) == list(range(1, 13))
    for step in range(1, 9):  # written by the 2-rank run before the change
        assert run["losses"][step] == ref["losses"][step]
    # Same loaded state (params, fp32 master, Adam moments and step, hyperparameters, LR, data
    # order all equal the 2-rank run's), so only float reduction order differs: measured
    # |Δ| <= 4.8e-7 at W=1 (1 ulp of the loss) and 0 at W=4, against ~0.1 nats of step-to-step
    # variation. (Before the fix in elastic.load_universal, DeepSpeed's universal loader shared
    # one Adam `step` tensor between ZeRO-3 sub-groups: 3e-5, 0.0066, 0.012 nats at steps 10-12.)
    for step in range(9, 13):
        assert abs(run["losses"][step] - ref["losses"][step]) < 1e-5, step
    mask_dir = fault_results["out"] / f"elastic_w{world}" / "private" / "mask"
    packed, _ = read_artifact(mask_dir)
    masks = full_masks(mask_dir)
    ref_packed, _ = read_artifact(fault_results["out"] / "fault_ref" / "private" / "mask")
    # No save_init: the Stage II checkpoint holds no θ(0); the complement is θ(0), so it must
    # equal the uninterrupted run's complement, and the drift against the rebuilt θ(0) is 0.
    assert _load(fault_results, f"elastic_w{world}_drift.pt") == 0.0
    for name, value in run["params"].items():
        assert torch.equal(packed[name], ref_packed[name]), name  # the same mask
        frozen = ~masks[name]
        assert torch.equal(value[frozen], ref["params"][name][frozen]), name
