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
    on constructed objects: `self.<name> =` / `param.<name> =` in the source, also as the
    first of a tuple target: `self.<name>, self.<other> =`)."""
    owner, _, attr = name.rpartition(".")
    if not owner and hasattr(obj, attr):
        return True
    return re.search(rf"\b{owner or 'self'}\.{re.escape(attr)}\s*(,[\w.\s]+)?=(?!=)",
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


LIBRARIES = ("deepspeed", "streaming")
PRIVATE = sorted({n.rpartition(".")[2] for v in ds_internals.RELIED_ON.values() for n in v
                  if n.rpartition(".")[2].startswith("_")} |
                 {"fp32_partitioned_groups_flat", "grad_partitions_flat_buffer", "fp16_groups",
                  "flat_groups"})
SPELLED = ("zero_pp_rank_", ds_internals.CLIENT_STATE_KEY, "prepare_shard")  # file names, our key


def library_offenders(path) -> list[str]:
    """What a module does with DeepSpeed / streaming that only ds_internals may do, read from its
    syntax tree (comments and docstrings do not count): an import of a library module or name
    that RELIED_ON does not list (a top-level `import deepspeed` is the public API), an
    attribute with a private name, or a string spelling DeepSpeed's file names, the `latest`
    pointer or our client-state key."""
    import ast
    from pathlib import Path
    path = Path(path)
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef,
                                       ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    out = []

    def listed(module: str, name: str) -> bool:
        return (name in ds_internals.RELIED_ON.get(module, ())
                or f"{module}:{name}" in ds_internals.RELIED_ON)
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name} (not in RELIED_ON)" for a in node.names
                    if a.name.split(".")[0] in LIBRARIES and "." in a.name
                    and a.name not in ds_internals.RELIED_ON]
        elif isinstance(node, ast.ImportFrom) and not node.level and \
                (node.module or "").split(".")[0] in LIBRARIES:
            out += [f"{where}: from {node.module} import {a.name} (not in RELIED_ON)"
                    for a in node.names if not listed(node.module, a.name)]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            out.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            out += [f"{where}: {node.value!r}" for n in SPELLED if n in node.value]
            if node.value == ds_internals.LATEST:
                out.append(f"{where}: {node.value!r} (ds_internals.LATEST)")
    return out


def test_library_internals_stay_in_one_module():
    """No other production module imports a DeepSpeed / streaming name RELIED_ON does not list
    (so the version check above covers every one), reaches into their private attributes, or
    spells their file names or our client-state key."""
    from pathlib import Path
    root = Path(ds_internals.__file__).parent
    offenders = [f"{path.relative_to(root)}: {o}" for path in sorted(root.rglob("*.py"))
                 if path.name != "ds_internals.py" or path.parent != root
                 for o in library_offenders(path)]
    assert not offenders, offenders


def test_guard_catches_planted_internals(tmp_path):
    """The checker reads syntax, not text: each planted use is caught, the same words in a
    comment or docstring are not."""
    planted = tmp_path / "leaky.py"
    planted.write_text(
        '"""Docstrings may name latest, zero_pp_rank_ files and ._shard_states."""\n'
        "import deepspeed\n"                                   # public: fine
        "from deepspeed.accelerator import get_accelerator\n"  # listed: fine
        "from streaming.base.util import get_list_arg\n"       # 4: not listed
        "import deepspeed.runtime.zero.stage3\n"               # 5: not listed
        "def f(engine, dataset, path):\n"
        "    # dataset._shard_states in a comment is fine\n"
        "    engine.optimizer.fp32_partitioned_groups_flat\n"  # 8
        "    dataset._shard_states\n"                          # 9
        "    return path / 'latest', 'zero_pp_rank_0'\n")     # 10: two
    assert [o.split(":")[1] for o in library_offenders(planted)] == \
        ["4", "5", "8", "9", "10", "10"], library_offenders(planted)


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
