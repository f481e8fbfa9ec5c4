"""The DeepSpeed / mosaicml-streaming internals pmp_scale relies on are still there.

Fails loudly on an upgrade: a version other than the checked one, or a name from
`ds_internals.RELIED_ON` that the installed library no longer has. Static (no process group):
cheap enough for every CI run.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from importlib.metadata import version

import pytest

from pmp_scale import ds_internals

RECHECK = ("re-read every entry of pmp_scale/ds_internals.py RELIED_ON (and the code using it) "
           "against the installed version, run the multi-rank tests, then update "
           "CHECKED_VERSIONS")


@pytest.mark.parametrize("package", sorted(ds_internals.CHECKED_VERSIONS))
def test_installed_versions_are_the_checked_ones(package):
    checked, installed = ds_internals.CHECKED_VERSIONS[package], version(package)
    assert installed == checked, (f"{package} {installed} is installed, but "
                                  f"pmp_scale.ds_internals was checked against {checked}: "
                                  f"{RECHECK}")


def _resolve(target: str):
    module_name, _, cls = target.partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, cls) if cls else module


def _present(module, obj, name: str) -> bool:
    """An attribute of `obj`, or one its module's code assigns (instance attributes exist only
    on constructed objects: `self.<name> =` / `param.<name> =` in the source)."""
    owner, _, attr = name.rpartition(".")
    if not owner and hasattr(obj, attr):
        return True
    return re.search(rf"\b{owner or 'self'}\.{re.escape(attr)}\s*=(?!=)",
                     inspect.getsource(module)) is not None


@pytest.mark.parametrize("target", sorted(ds_internals.RELIED_ON))
def test_relied_on_names_exist(target):
    try:
        module, obj = _resolve(target)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{target} no longer exists ({err}): {RECHECK}")
    missing = [n for n in ds_internals.RELIED_ON[target] if not _present(module, obj, n)]
    assert not missing, f"{target} no longer has {', '.join(missing)}: {RECHECK}"


def test_streaming_takes_the_local_world_size_only_while_a_dataset_is_built(monkeypatch):
    """Streaming reads LOCAL_WORLD_SIZE from the environment; the deepspeed launcher exports
    LOCAL_SIZE. Inside the scope streaming sees it; the environment is never written, and
    after the scope streaming is as it was."""
    from streaming.base.world import World
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    before = dict(os.environ)
    with ds_internals.launcher_local_world_size():
        world = World.detect()
        assert dict(os.environ) == before
    assert (world.ranks_per_node, world.num_nodes) == (4, 2)
    assert World.detect().ranks_per_node == 1  # streaming's own answer again
    assert dict(os.environ) == before
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's own value wins
    with ds_internals.launcher_local_world_size():
        assert World.detect().ranks_per_node == 2
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"


def test_checkpoint_file_names():
    name = ds_internals.model_states_file(3)
    assert ds_internals.MODEL_STATES.match(name).group(1) == "3"
    assert ds_internals.file_rank(name) == 3
    assert ds_internals.file_rank("bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt") == 5
    assert ds_internals.OPTIM_STATES.match("bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt")
    assert ds_internals.file_rank("pmp_scale.json") is None


def test_private_names_stay_in_one_module():
    """No other production module reaches into DeepSpeed's or streaming's private names, nor
    spells their file names or our client-state key."""
    from pathlib import Path
    root = Path(ds_internals.__file__).parent
    names = {n.rpartition(".")[2] for v in ds_internals.RELIED_ON.values() for n in v}
    private = sorted(n for n in names if n.startswith("_") or n in (
        "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer", "fp16_groups"))
    spelled = private + ["zero_pp_rank_", "pmp_components", "prepare_shard"]
    # Not switched over yet (their owners do that next); remove each once it uses ds_internals.
    pending = ()
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if rel == "ds_internals.py" or rel.startswith(pending):
            continue
        text = path.read_text()
        offenders += [f"{rel}: {n}" for n in spelled if re.search(rf"\b{re.escape(n)}", text)]
    assert not offenders, offenders


ENV_WRITE = re.compile(r"os\.environ\s*\[[^\]]+\]\s*=(?!=)|os\.environ\.(?:setdefault|pop|update|"
                       r"clear|popitem)\(|del\s+os\.environ|os\.(?:putenv|unsetenv)\(")


def test_the_package_never_writes_the_environment_nor_reads_a_fault_variable(tmp_path):
    """The process environment is the entry points' (launchers/, tools/) to set; the package
    only reads it, and fault injection is an object handed in, never an environment variable.
    The checker catches a planted write."""
    from pathlib import Path
    root = Path(ds_internals.__file__).parent

    def offenders(paths):
        return [f"{p.name}:{i}" for p in paths for i, line in
                enumerate(p.read_text().splitlines(), 1)
                if ENV_WRITE.search(line) or "PMP_FAULT" in line]
    assert offenders(sorted(root.rglob("*.py"))) == []
    planted = tmp_path / "leaky.py"
    planted.write_text('import os\nos.environ["LOCAL_RANK"] = "0"\nos.environ.setdefault("A", "1")\n'
                       'x = os.environ.get("PMP_FAULT")\nif os.environ["A"] == "1": pass\n')
    assert offenders([planted]) == ["leaky.py:2", "leaky.py:3", "leaky.py:4"]


def test_quiet_third_party_hides_notices_unless_verbose():
    import logging
    import warnings
    from deepspeed.utils import logger as ds_logger
    from pmp_scale.cli import quiet_third_party
    levels = {n: logging.getLogger(n).level for n in ("torch.utils.cpp_extension", "streaming")}
    ds_level = ds_logger.level
    notice = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ..."
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet_third_party(verbose=False)
            warnings.warn(notice, FutureWarning)
            warnings.warn("ours", FutureWarning)  # anything else still shows
        assert [str(w.message) for w in seen] == ["ours"]
        assert logging.getLogger("torch.utils.cpp_extension").level == logging.ERROR
        assert importlib.import_module("deepspeed.comm.torch").build_shm_op.pmp_quiet
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet_third_party(verbose=True)
            warnings.warn(notice, FutureWarning)
        assert len(seen) == 1 and ds_logger.level == logging.INFO
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        ds_logger.setLevel(ds_level)
