"""The GPU machine, simulated on CPU: tools/gpu_check.sh at tiny size in an environment built
like the GPU image, and the release and the licensee kit under its transformers 5.

The image: a fresh virtualenv that sees this venv's packages through a folder of links, less
everything the GPU image does not have (transformers 4, tokenizers, huggingface_hub and
numpy are hidden and replaced by transformers 5.17, numpy 2.x and their own dependencies; the
packages of the wheel set, DeepSpeed, streaming, pydantic, datasets and the codecs, are
hidden too). Those four are installed from wheels downloaded once from the package index
into .whl/ (ignored by git); after that nothing reaches an index: the check installs the
wheel set of tools/gpu_wheels.sh (for this python) with --no-index --no-deps --target, as on
the GPU. Without an index on the first run the test skips, saying so.

The extended tier (`tools/test.sh --all`): about 4 minutes on 2 cores (an environment built,
the wheel set built from its sources, the whole device script at tiny size), which the
default tier's 15-minute budget cannot hold. Run it before touching tools/gpu_check.sh,
tools/gpu_wheels.sh or the transformers-5 paths.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.extended

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
IMAGE_PACKAGES = ["transformers==5.17.*", "tokenizers>=0.23,<0.24", "numpy>=2,<3"]
# What the GPU image lacks (the wheel set brings it) or has at another version (the image's
# own is installed below): hidden from the simulated image.
HIDDEN = {"transformers", "tokenizers", "huggingface-hub", "numpy", "pmp-scale", "deepspeed",
          "mosaicml-streaming", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "datasets", "dill", "multiprocess", "xxhash", "hjson",
          "py-cpuinfo", "msgpack", "einops", "brotli", "python-snappy", "cramjam", "zstd",
          "catalogue", "sentencepiece"}
CACHE = REPO / ".whl"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in its own session: on a timeout every process it started is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _image_wheels() -> Path:
    """transformers 5 + numpy 2 and their dependencies, downloaded once (skip without an index)."""
    key = hashlib.sha256(" ".join(IMAGE_PACKAGES).encode()).hexdigest()[:12]
    cache = CACHE / f"sim-image-py{PY}-{key}"
    if not (cache / ".complete").is_file():
        proc = _run([sys.executable, "-m", "pip", "download", "--quiet",
                     "--disable-pip-version-check", "--only-binary=:all:", "-d", str(cache),
                     *IMAGE_PACKAGES], 600)
        if proc.returncode != 0:
            pytest.skip(f"no package index to download transformers 5 / numpy 2 for the "
                        f"simulated GPU image: {proc.stderr.strip().splitlines()[-1:]}")
        (cache / ".complete").write_text("")
    return cache


def _wheel_set() -> Path:
    """tools/gpu_wheels.sh for this python, built once per constraints.txt."""
    key = hashlib.sha256((REPO / "constraints.txt").read_bytes()).hexdigest()[:12]
    out = CACHE / f"device-py{PY}-{key}"
    if not (out / ".complete").is_file():
        proc = _run(["bash", str(REPO / "tools" / "gpu_wheels.sh"), str(out), "--python", PY],
                    900, cwd=REPO, env={**os.environ, "PYTHON": sys.executable})
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1:]
            if "error:" in " ".join(why):  # the script's own refusal, not the network
                pytest.fail(f"tools/gpu_wheels.sh failed: {why}")
            pytest.skip(f"could not build the wheel set (no package index?): {why}")
        (out / ".complete").write_text(proc.stdout)
    return out


def _link_farm(dst: Path) -> None:
    """This venv's site-packages as links, less the HIDDEN distributions and any .pth."""
    site = Path(md.distribution("torch").locate_file(""))
    hide = set()
    for dist in md.distributions(path=[str(site)]):
        if _norm(dist.metadata["Name"]) in HIDDEN:
            hide.add(Path(dist._path).name)
            hide.update(f.parts[0] for f in dist.files or [])
    dst.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in hide and entry.suffix != ".pth" and entry.name != "__pycache__":
            (dst / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """{python, wheels, env}: the simulated image's python and the environment to run it in."""
    image_wheels, wheels = _image_wheels(), _wheel_set()
    root = tmp_path_factory.mktemp("device")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   60).stdout.strip()
    # named site-packages like any installed library folder: dill (datasets' hashing) pickles
    # functions of modules elsewhere by value, and fails on pyarrow's types
    _link_farm(root / "image" / "site-packages")
    (Path(purelib) / "image.pth").write_text(str(root / "image" / "site-packages") + "\n")
    proc = _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-index", "--find-links", str(image_wheels), *IMAGE_PACKAGES], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_FIND_LINKS")}
    # DeepSpeed JIT-builds its CPU ops (shm comm) from the carried copy: into a cache of its
    # own, never the one this venv's DeepSpeed builds into, at a fixed path so reruns reuse it.
    env.update({"PIP_NO_INDEX": "1", "DS_ACCELERATOR": "cpu", "TMPDIR": str(root),
                "TORCH_EXTENSIONS_DIR": str(CACHE / f"sim-torch-extensions-py{PY}")})
    probe = _run([str(python), "-c", "import transformers, numpy; "
                  "print(transformers.__version__, numpy.__version__)"], 120, env=env)
    assert probe.stdout.split()[0].startswith("5.") and probe.stdout.split()[1].startswith("2.")
    for hidden in ("deepspeed", "streaming", "datasets"):  # only the wheel set brings them
        assert _run([str(python), "-c", f"import {hidden}"], 60, env=env).returncode != 0
    return {"python": str(python), "wheels": wheels, "env": env, "root": root}


@pytest.fixture(scope="module")
def check(device):
    """One tiny run of the device script in the simulated image."""
    out, root = device["root"] / "out", device["root"]
    site = CACHE / f"sim-py{PY}" / "site-packages"  # fixed: the JIT-built ops' cache stays valid
    env = {**device["env"], "PYTHON": device["python"], "GPU_CHECK_SITE": str(site),
           "GPU_CHECK_WORK": str(root / "work")}
    proc = _run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(out), str(device["wheels"]),
                 "--tiny"], 1500, cwd=REPO, env=env)
    return {"proc": proc, "out": out, "site": site, "work": root / "work",
            "python": device["python"], "env": device["env"]}


@pytest.mark.timeout(2400)
def test_device_script_at_tiny_size_writes_its_table(check):
    proc, out = check["proc"], check["out"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    machine = next(ln for ln in table.splitlines() if ln.startswith("machine: "))
    assert machine.startswith("machine: device cpu, python ") and "transformers 5.17." in machine
    assert "numpy 2." in machine and "deepspeed 0.19.7" in machine, machine
    rows = {m[1]: m[2] for m in re.finditer(r"^\| ([^|]+?) \| (\w+) \| [\d.]+ \|", table, re.M)}
    assert rows["install"] == rows["imports"] == rows["bench"] == rows["study"] == "ok", rows
    assert {"study: pre-training gpt2-tiny__dense", "study: release gpt2-tiny__dense",
            "study: secrecy gpt2-tiny__r0.5_random_frozen"} <= set(rows), rows
    assert re.search(r"^\| tokens/s \| [\d,]+ \| [\d,]+ \|$", table, re.M), table
    assert "| claim | where | measured" in table and "| base preserved |" in table
    # the carried packages came from the site, the image's own stayed the image's
    site = str(check["site"])
    where = _run([check["python"], "-c",
                  "import deepspeed, streaming, transformers, numpy\n"
                  "for m in (deepspeed, streaming, transformers, numpy): print(m.__file__)"],
                 120, env={**check["env"], "PYTHONPATH": site}).stdout.split()
    assert where[0].startswith(site) and where[1].startswith(site), where
    assert not where[2].startswith(site) and not where[3].startswith(site), where


@pytest.mark.timeout(900)
def test_release_and_licensee_kit_under_transformers_5(device, check):
    """The study's PMP release loads, audits and generates under transformers 5 (GPT-2 BPE);
    the licensee kit's README snippets and example script, and the SentencePiece tokenizer a
    Llama release carries, run there as tests/test_authorized.py and test_data.py run them."""
    assert check["proc"].returncode == 0, "the device script failed (see the test above)"
    env = {**device["env"], "PYTHONPATH": f"{check['site']}:{REPO}", "HF_HUB_OFFLINE": "1"}
    release = check["work"] / "study" / "releases" / "gpt2-tiny__r0.5_random_frozen"
    audit = _run([device["python"], str(REPO / "tools" / "audit_release.py"), str(release)],
                 600, cwd=REPO, env=env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    load = _run([device["python"], "-c", f"""
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from pmp_scale.data import load_tokenizer
tok = AutoTokenizer.from_pretrained({str(release)!r})
ours = load_tokenizer({str(REPO / 'data' / 'tokenizers' / 'gpt2-bpe')!r})
text = "  Anne Elliot walked to Uppercross. 日本語"
assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
model = AutoModelForCausalLM.from_pretrained({str(release)!r})
ids = tok("Anne", return_tensors="pt")["input_ids"]
print(transformers.__version__, model.generate(ids, max_new_tokens=3, do_sample=False).shape[1])
"""], 300, cwd=REPO, env=env)
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.split()[0].startswith("5.") and load.stdout.split()[1] == "4"
    kit = _run([device["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_authorized.py::test_readme_trainer_snippet_bf16_accumulation_clipping",
                "tests/test_authorized.py::test_readme_plain_loop_snippet",
                "tests/test_authorized.py::test_example_script_fine_tunes_and_saves",
                "tests/test_data.py::test_sentencepiece_save_hf_encodes_identically",
                "tests/test_data.py::test_gpt2_bpe_dir_and_save_hf",
                "tests/test_tokenizer_guard.py"], 900, cwd=REPO, env=env)
    assert kit.returncode == 0, kit.stdout[-4000:] + kit.stderr[-2000:]
    assert re.search(r"\b9 passed\b", kit.stdout), kit.stdout[-2000:]


@pytest.mark.timeout(600)
def test_without_the_wheel_set_the_check_names_what_is_missing(device, tmp_path):
    """The image alone lacks DeepSpeed, streaming, datasets ...: one line before anything runs."""
    env = {**device["env"], "PYTHON": device["python"], "GPU_CHECK_WORK": str(tmp_path / "w")}
    proc = _run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "out"), "--tiny"],
                500, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: missing "), proc.stderr
    for name in ("deepspeed (deepspeed)", "mosaicml-streaming (streaming)", "datasets (datasets)",
                 "zstd (zstd)", "python-snappy (snappy)", "tools/gpu_wheels.sh"):
        assert name in lines[0], lines[0]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| imports | failed |" in table and "| bench |" not in table
