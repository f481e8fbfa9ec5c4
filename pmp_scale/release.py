"""Stage III: a ZeRO-3 checkpoint → a standard, mask-free Hugging Face model; its audit; the mask.

A release must look like any other pre-trained model: dense weights, an HF config, a tokenizer.
Everything else a checkpoint holds reveals the mask (optimizer moments are exactly zero on the
complement; seeds and θ(0) regenerate it; RNG and data state are private too; docs/design.md "Mask
secrecy"). Weights are rebuilt with DeepSpeed's own lazy ZeRO-3 reconstruction and streamed one
tensor at a time into safetensors shards whose headers are planned up front, so memory stays
bounded by the largest tensor, at any model size and any world size.

The private side: export the mask from a checkpoint's per-rank client state into the private
artifact, re-slice it for any world size, and bind an artifact to its release by a sha256.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .mask.artifact import (META_FILE, MaskArtifactError, move_into_place, merge_rank_slices,
                            read_artifact, slice_for_rank, write_artifact)
from .mask.bits import pack_bits, unpack_bits
from .mask.select import LocalSlice
from .secrecy.stats import release_channels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INIT_FILE = "init.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ReleaseError(ValueError):
    """Input that cannot be released, exported or audited as asked; the message says why."""


# --- locating a checkpoint ------------------------------------------------------------------------
_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
# DeepSpeed prefixes the optimizer files of bf16 runs with `bf16_` (engine._get_zero_ckpt_prefix)
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def rank_files(tag_dir: Path) -> list[Path]:
    """The per-rank model-state files of a ZeRO-3 checkpoint tag, in rank order."""
    if not tag_dir.is_dir():
        raise ReleaseError(f"no checkpoint at {tag_dir}")
    names = [f.name for f in tag_dir.iterdir()]
    ranks = {int(m.group(1)): tag_dir / m.group(0) for m in map(_MODEL_STATES.match, names) if m}
    optim = sorted(int(m.group(1)) for m in map(_OPTIM_STATES.match, names) if m)
    if not ranks or sorted(ranks) != list(range(len(ranks))) or optim != sorted(ranks):
        found = sorted(n for n in names if n.endswith(".pt")) or "no .pt files"
        raise ReleaseError(f"{tag_dir} is not a ZeRO-3 checkpoint: expected zero_pp_rank_R_mp_rank_00_"
                           f"model_states.pt and [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt "
                           f"for R = 0..W-1, found {found}")
    return [ranks[r] for r in range(len(ranks))]


def resolve_checkpoint(path, tag: str | None = None, verify: bool = True) -> Path:
    """The tag directory meant by a run dir, its `checkpoints/` dir or a tag dir (`latest` by default).

    With `verify`, the tag must be complete (the trainer's completion marker) and every file
    must match its recorded checksum: a crash mid-save or a corrupt shard is never released."""
    from .checkpoint import INCOMPLETE, tag_problem
    path = Path(path)
    if not path.exists():
        raise ReleaseError(f"no checkpoint at {path}: it does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if tag is not None and path.name != tag:
        path = path / tag
    elif tag is None and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    rank_files(path)
    problem = tag_problem(path) if verify else None
    if problem is not None:
        hint = (" (a ZeRO-3 checkpoint not written by pmp_scale has no marker: release it with "
                "tools/release.py --unverified)" if problem == INCOMPLETE else "")
        raise ReleaseError(f"checkpoint {path} is not usable: {problem}; name another with "
                           f"--tag{hint}")
    return path


# --- streaming reconstruction ----------------------------------------------------------------------
@contextlib.contextmanager
def _mmap_torch_loads():
    """DeepSpeed's reader torch.loads each rank's whole model-state file, client state (θ(0)
    slices: model-sized) included, to read a few small entries; memory-mapped, the rest stays on disk."""
    from torch.utils.serialization import config
    before, config.load.mmap = config.load.mmap, True
    try:
        yield
    finally:
        config.load.mmap = before


def lazy_state_dict(tag_dir: Path) -> dict:
    """name -> lazy fp32 tensor (`.contiguous()` materialises it) from DeepSpeed's ZeRO-3
    reconstruction; tied aliases (GPT-2 lm_head = wte) are dropped, as save_pretrained drops them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    rank_files(tag_dir)
    try:
        with _mmap_torch_loads(), open(os.devnull, "w") as quiet, \
                contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its prints and bars
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name,
                                                            lazy_mode=True)
    except ValueError as e:
        raise ReleaseError(f"{tag_dir}: DeepSpeed cannot rebuild this checkpoint: {e}") from e
    seen, out = set(), {}
    for name, tensor in full.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


_MADV_PAGEOUT = 21  # Linux >= 5.4


def _page_out(lazy: Mapping) -> None:
    """Give the pages of the memory-mapped fp32 partitions back to the kernel.

    Touched pages of a mapping count towards RSS until unmapped, so streaming a multi-GB
    checkpoint would end with all of it resident. MADV_PAGEOUT never loses data: clean file
    pages are simply read again if touched again. A no-op where unsupported.
    """
    if sys.platform != "linux":
        return
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    groups = next((t.flat_groups for t in lazy.values() if hasattr(t, "flat_groups")), [])
    for rank_groups in groups:
        for flat in rank_groups:
            start = flat.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
            madvise(start, flat.data_ptr() + flat.numel() * flat.element_size() - start, _MADV_PAGEOUT)


# --- safetensors written tensor by tensor ----------------------------------------------------------
def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _digest_update(h, name: str, t: torch.Tensor) -> None:
    """Release sha256: per tensor, sorted by name: name, dtype, shape, then its raw bytes."""
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    h.update(_raw(t))


def _header(items: list[tuple[str, torch.dtype, tuple]]) -> tuple[bytes, dict[str, int]]:
    """safetensors header (metadata {"format": "pt"} only, as transformers writes) + data offsets."""
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, dtype, shape in items:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name], pos = pos, pos + n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, offsets


def _stream_safetensors(plan: dict[Path, list[tuple[str, torch.dtype, tuple]]],
                        tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write files whose headers are known up front; tensors arrive one at a time, in any order
    that keeps each file's own order (each file is appended to sequentially)."""
    where, specs, files = {}, {}, []
    with contextlib.ExitStack() as stack:
        for path, items in plan.items():
            f = stack.enter_context(open(path, "wb"))
            files.append(f)
            head, offsets = _header(items)
            f.write(head)
            for name, dtype, shape in items:
                where[name], specs[name] = (f, len(head) + offsets[name]), (dtype, tuple(shape))
        for name, t in tensors:
            f, pos = where.pop(name)
            if (t.dtype, tuple(t.shape)) != specs[name] or f.tell() != pos:
                raise RuntimeError(f"{name}: {t.dtype} {tuple(t.shape)} at byte {f.tell()} does not "
                                   f"match the planned {specs[name]} at byte {pos}")
            f.write(_raw(t))
        if where:
            raise RuntimeError(f"tensors never written: {sorted(where)}")
        for f in files:
            f.flush()
            os.fsync(f.fileno())


def _write_weights(out: Path, lazy: dict, dtype: torch.dtype, max_shard_size,
                   progress: bool) -> tuple[str, list[str]]:
    """model[-i-of-n].safetensors (+ index) split the HF way; returns the release sha256 and
    the exact mask channels (bits, constants) its tensors show (secrecy.stats)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm import tqdm
    names = sorted(lazy)
    split = split_torch_state_dict_into_shards(
        {n: torch.empty(lazy[n].shape, dtype=dtype, device="meta") for n in names},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    plan = {out / f: [(n, dtype, tuple(lazy[n].shape)) for n in ns]
            for f, ns in split.filename_to_tensors.items()}
    digest, channels = hashlib.sha256(), []
    bar = tqdm(total=split.metadata["total_size"], unit="B", unit_scale=True, desc="release",
               disable=not progress)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:  # sorted: the sha256 order, and each shard's own order
            t = lazy[name].contiguous().to(dtype)
            _digest_update(digest, name, t)
            channels.extend(release_channels(name, t))
            yield name, t
            bar.update(t.numel() * t.element_size())
            del t
            _page_out(lazy)
    with bar:
        _stream_safetensors(plan, tensors())
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(math.prod(lazy[n].shape) for n in names),
                              **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return digest.hexdigest(), channels


# --- release ---------------------------------------------------------------------------------------
def _write_description(hf_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json as save_pretrained writes it (architectures, dtype); the rest of hf/ copied.
    The architecture is the one hf/config.json names (a fine-tuned classifier does), else the
    family's causal LM (what pre-training checkpoints hold)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    if not config.architectures:
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    for f in sorted(hf_dir.iterdir()):
        if f.is_file() and f.name != "config.json":
            shutil.copyfile(f, out / f.name)


def _trained_shapes(lazy: Mapping) -> dict[str, list[int]]:
    """Shapes of the partitioned (trained) parameters: DeepSpeed returns buffers as real tensors."""
    return {n: list(t.shape) for n, t in lazy.items() if not isinstance(t, torch.Tensor)}


def _check_private_matches(private_dir: Path, lazy: Mapping) -> None:
    try:
        _, meta = read_artifact(private_dir)
    except MaskArtifactError as e:
        raise ReleaseError(str(e)) from e
    mine, theirs = _trained_shapes(lazy), meta["shapes"]
    if mine != theirs:
        diff = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
        raise ReleaseError(f"{private_dir}: this mask artifact does not describe the checkpoint's "
                           f"parameters (names or shapes differ: {diff[:5]})")


def record_release(private_dir, sha256: str, dtype: str) -> None:
    """Bind the private artifact to its release: sha256 and dtype go into mask.json, atomically."""
    path = Path(private_dir) / META_FILE
    meta = json.loads(path.read_text())
    meta.update(release_sha256=sha256, release_dtype=dtype)
    tmp = path.with_name(f".{META_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _refuse_non_empty(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ReleaseError(f"{path} is not empty; pass --overwrite to replace it")


def release_checkpoint(tag_dir, out_dir, hf_dir=None, dtype: str = "fp32",
                       max_shard_size: int | str = "2GB", overwrite: bool = False,
                       private_dir=None, progress: bool = True, allow_leaks: bool = False) -> str:
    """Write a ZeRO-3 checkpoint tag (any world size) as a standard HF model directory; returns
    the release sha256.

    `hf_dir` (default `<tag>/hf`, written by the trainer) supplies config, generation config and
    tokenizer, so any ZeRO-3 checkpoint can be released (pre-training or fine-tuning). Everything
    is written beside `out_dir` and renamed into place after a static audit: a failure leaves
    neither a partial release nor a damaged old one. With `private_dir`, the mask artifact must
    describe exactly these parameters; the release's sha256 and dtype go into its mask.json.
    A release whose weights show an exact mask channel (frozen elements with a narrower dtype's
    bits, or piled up on their init constant) is refused unless `allow_leaks` (research).
    """
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    hf_dir = Path(hf_dir) if hf_dir is not None else tag_dir / "hf"
    if dtype not in DTYPES:
        raise ReleaseError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _refuse_non_empty(out_dir, overwrite)
    if not (hf_dir / "config.json").is_file():
        raise ReleaseError(f"{hf_dir} has no config.json: the release needs the HF description "
                           "the trainer writes beside each checkpoint (<tag>/hf)")
    lazy = lazy_state_dict(tag_dir)
    if private_dir is not None:
        _check_private_matches(Path(private_dir), lazy)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_description(hf_dir, tmp, DTYPES[dtype])
        sha256, channels = _write_weights(tmp, lazy, DTYPES[dtype], max_shard_size, progress)
        if channels and not allow_leaks:
            raise ReleaseError(
                f"refusing to publish {out_dir}: it would give its mask away — {channels[0]}"
                + (f" (and {len(channels) - 1} more)" if len(channels) > 1 else "")
                + ". Fix the run (fp32 θ(0), pmp.exclude_constant_init) or release in the dtype "
                "θ(0) was drawn in; --allow-leaks releases it anyway, for research")
        problems = audit_files(tmp)
        if problems:
            raise ReleaseError(f"refusing to publish {out_dir}: {'; '.join(problems)}")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if private_dir is not None:
        record_release(private_dir, sha256, dtype)
    return sha256


# --- audit -----------------------------------------------------------------------------------------
# What may never appear in a file name, tensor name, config key or safetensors metadata key.
FORBIDDEN = re.compile(r"mask|optim|rng|seed|zero_pp|theta0|theta_0|exp_avg|pmp|private", re.I)
_CONFIGS = ("config.json", "generation_config.json", "tokenizer_config.json",
            "special_tokens_map.json")
_KNOWN_FILES = {*_CONFIGS, INDEX_FILE, "tokenizer.json", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "README.md", "LICENSE"}
_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_PICKLES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"}
_FLOAT_CODES = {"F32", "BF16", "F16"}
_INDEX_METADATA = {"total_size", "total_parameters"}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _forbidden_keys(obj, prefix: str = "") -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if FORBIDDEN.search(str(key)):
                yield prefix + str(key)
            yield from _forbidden_keys(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for value in obj:
            yield from _forbidden_keys(value, prefix)


def audit_files(release_dir) -> list[str]:
    """Static checks (names, file types, headers, configs): one line per problem, none if clean."""
    root = Path(release_dir)
    problems, tensors = [], {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir():
            problems.append(f"{rel}: unexpected directory (a release is flat)")
            continue
        if FORBIDDEN.search(path.name):
            problems.append(f"{rel}: forbidden file name (training or PMP state)")
        if path.suffix in _PICKLES:
            problems.append(f"{rel}: pickle file (arbitrary code and state; releases use safetensors)")
        elif path.parent != root or not (path.name in _KNOWN_FILES or _WEIGHTS.match(path.name)):
            problems.append(f"{rel}: unknown file type")
        if _WEIGHTS.match(path.name) and path.parent == root:
            try:
                header = _safetensors_header(path)
            except (OSError, ValueError, struct.error) as e:
                problems.append(f"{rel}: unreadable safetensors header: {e}")
                continue
            meta = header.pop("__metadata__", None)
            if meta != {"format": "pt"}:
                problems.append(f"{rel}: metadata {meta} (only {{'format': 'pt'}} is allowed)")
            for name, info in header.items():
                tensors[name] = path.name
                if FORBIDDEN.search(name):
                    problems.append(f"{rel}: tensor {name!r} has a forbidden name")
                if info.get("dtype") not in _FLOAT_CODES:
                    problems.append(f"{rel}: tensor {name!r} is {info.get('dtype')} (weights are "
                                    "float; masks are bool or packed uint8)")
    if not tensors:
        problems.append("no model.safetensors or model-*-of-*.safetensors weights")
    if (root / INDEX_FILE).is_file():
        index = json.loads((root / INDEX_FILE).read_text())
        extra = set(index.get("metadata", {})) - _INDEX_METADATA
        if extra:
            problems.append(f"{INDEX_FILE}: metadata keys {sorted(extra)} "
                            f"(allowed: {sorted(_INDEX_METADATA)})")
        if index.get("weight_map") != tensors:
            problems.append(f"{INDEX_FILE}: weight_map does not list exactly the tensors in the shards")
    for name in _CONFIGS:
        if (root / name).is_file():
            problems += [f"{name}: key {key!r} is training or PMP state"
                         for key in _forbidden_keys(json.loads((root / name).read_text()))]
    return problems


def release_tensors(release_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """The release's tensors in sorted name order (the sha256 order), one in memory at a time."""
    from safetensors import safe_open
    root = Path(release_dir)
    if (root / INDEX_FILE).is_file():
        files = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    else:
        files = {n: "model.safetensors" for n in _safetensors_header(root / "model.safetensors")
                 if n != "__metadata__"}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(root / f), framework="pt"))
                   for f in sorted(set(files.values()))}
        for name in sorted(files):
            yield name, handles[files[name]].get_tensor(name)


def release_sha256(release_dir) -> str:
    """The sha256 that binds a private artifact to its release (see _digest_update)."""
    digest = hashlib.sha256()
    for name, t in release_tensors(release_dir):
        _digest_update(digest, name, t)
    return digest.hexdigest()


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern as integers: exact comparison, -0.0 != 0.0 and NaN == NaN by bits."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)  # each one fails the audit
    report: list[str] = field(default_factory=list)    # informational lines


def _load_and_generate(release_dir: Path, audit: Audit) -> None:
    """Load the release the way its users will, offline, and run it: a causal LM generates a few
    greedy tokens; another head (a fine-tuned classifier) classifies the prompt."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    arch = (AutoConfig.from_pretrained(release_dir, local_files_only=True).architectures
            or ["?ForCausalLM"])[0]
    causal = arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")
    loader = AutoModelForCausalLM if causal else getattr(transformers, arch, None)
    if loader is None:
        audit.problems.append(f"config.json names architecture {arch!r}, unknown to transformers")
        return
    try:
        model, info = loader.from_pretrained(
            release_dir, local_files_only=True, output_loading_info=True)
    except Exception as e:  # anything transformers raises means "does not load like a model"
        audit.problems.append(f"{loader.__name__}.from_pretrained failed: {type(e).__name__}: {e}")
        return
    try:
        tok = AutoTokenizer.from_pretrained(release_dir, local_files_only=True)
    except Exception as e:
        audit.problems.append(f"AutoTokenizer.from_pretrained failed (are the tokenizer files "
                              f"there?): {type(e).__name__}: {e}")
        return
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            audit.problems.append(f"from_pretrained: {kind.replace('_', ' ')}: {sorted(info[kind])[:5]}")
    prompt = "It is a truth universally acknowledged"
    ids = tok(prompt, return_tensors="pt")
    loaded = (f"loaded {type(model).__name__} ({model.num_parameters():,} parameters, "
              f"{model.dtype})")
    with torch.no_grad():
        if not causal:
            label = int(model(**ids).logits.argmax(-1)[0])
            audit.report.append(f"{loaded}; the prompt is classified as label {label}")
            return
        out = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                             else tok.eos_token_id)
    audit.report.append(f"{loaded}; greedy: {tok.decode(out[0], skip_special_tokens=True)!r}")


def _scan_tensors(release_dir: Path, private_dir: Path | None, audit: Audit) -> bool:
    """One pass over the weights: sha256, complement == θ(0), exact channels. True when the
    private artifact belongs to this release (so attacks can be scored against it)."""
    from safetensors import safe_open
    masks = meta = init = None
    if private_dir is not None:
        try:
            masks, meta = read_artifact(private_dir)
        except MaskArtifactError as e:
            audit.problems.append(str(e))
            private_dir = None
    # `complement: decay | project` moves the complement on purpose: nothing to check there.
    moving = meta is not None and meta.get("complement", "frozen") != "frozen"
    with contextlib.ExitStack() as stack:
        if private_dir is not None and (private_dir / INIT_FILE).is_file() and not moving:
            init = stack.enter_context(safe_open(str(private_dir / INIT_FILE), framework="pt"))
        digest, names, channels = hashlib.sha256(), set(), []
        for name, t in release_tensors(release_dir):
            names.add(name)
            _digest_update(digest, name, t)
            channels += release_channels(name, t)
            if init is not None and name in masks:
                frozen = ~unpack_bits(masks[name], t.numel())
                theta0 = init.get_tensor(name).to(t.dtype).reshape(-1)
                moved = int((_int_view(t.reshape(-1)) != _int_view(theta0))[frozen].sum())
                if moved:
                    audit.problems.append(f"{name}: {moved} of {int(frozen.sum())} complement "
                                          f"elements differ from θ(0) (as {t.dtype})")
    sha = digest.hexdigest()
    audit.report.append(f"release sha256 {sha}")
    audit.problems += channels
    audit.report.append(f"exact channels (bits, constants) from the release's own statistics: "
                        f"{len(channels) or 'none'}")
    if meta is None:
        return False
    missing = sorted(set(masks) - names)
    if missing:
        audit.problems.append(f"{private_dir}: mask names not in the release: {missing[:5]}")
    recorded = meta.get("release_sha256")
    if recorded is None:
        audit.problems.append(f"{private_dir / META_FILE} records no release_sha256 "
                              f"(tools/release.py --private {private_dir})")
    elif recorded != sha:
        audit.problems.append(f"sha mismatch: {private_dir} belongs to another release "
                              f"(recorded {recorded[:16]}…, this release {sha[:16]}…)")
    audit.report.append(f"private artifact {private_dir}: release sha256 "
                        f"{'matches' if recorded == sha else 'does not match'}; complement vs θ(0) "
                        + ("checked" if init is not None else
                           f"not checked (complement: {meta['complement']} moves it by design)"
                           if moving else f"not checked (no {INIT_FILE})"))
    return not missing and recorded == sha


def audit_release(release_dir, private_dir=None, load: bool = True) -> Audit:
    """Everything a publisher should check before uploading (see tools/audit_release.py)."""
    root = Path(release_dir)
    if not root.is_dir():
        raise ReleaseError(f"no release at {root}")
    if not (root / "config.json").is_file():
        raise ReleaseError(f"{root} is not a release: no config.json (give the directory "
                           "tools/release.py wrote)")
    audit = Audit(problems=audit_files(root))
    for path in sorted(root.rglob("*")):
        if path.is_file():
            line = f"file {path.relative_to(root)} ({path.stat().st_size:,} bytes)"
            if path.suffix == ".safetensors":
                with contextlib.suppress(OSError, ValueError, struct.error):
                    line += f" metadata {_safetensors_header(path).get('__metadata__')}"
            audit.report.append(line)
    if load:
        _load_and_generate(root, audit)
    if not any(_WEIGHTS.match(p.name) for p in root.iterdir()):
        return audit
    if _scan_tensors(root, Path(private_dir) if private_dir is not None else None, audit):
        _attack(root, Path(private_dir), audit)
    return audit


def _attack(release_dir: Path, private_dir: Path, audit: Audit) -> None:
    """The data-free mask-recovery attacks, scored against the true mask (the owner's view)."""
    from .secrecy import DATA_FREE, AttackError, leaks, run_attacks
    try:
        result = run_attacks(release_dir, private_dir=private_dir, attacks=DATA_FREE)
    except AttackError as e:
        audit.problems.append(str(e))
        return
    for name, r in result["attacks"].items():
        audit.report.append(f"attack {name} ({r['channel']}): AUC {r['auc']:.3f}"
                            if r["auc"] is not None else f"attack {name}: no AUC (one class)")
    audit.problems += leaks(result)


# --- the private mask: export from a checkpoint, re-slice for another world size --------------------
def merge_mask_slices(rank_bits: list[Mapping[str, torch.Tensor]],
                      shapes: Mapping[str, tuple]) -> Iterator[tuple[str, torch.Tensor, tuple]]:
    """(name, full packed mask, shape) from per-rank packed ZeRO-3 slices (rank r: {name:
    packed}, each slice packed from its own bit 0); one parameter is unpacked at a time."""
    world = len(rank_bits)
    for name, shape in shapes.items():
        numel = math.prod(shape)
        lengths = [LocalSlice.for_rank(0, numel, r, world).length for r in range(world)]
        yield name, merge_rank_slices([bits[name] for bits in rank_bits], lengths), tuple(shape)


def _pmp_states(tag_dir: Path) -> tuple[list[dict], list[dict]]:
    """Each rank's model states (memory-mapped) and its PMP client state, checked for a mask."""
    files = rank_files(tag_dir)
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in files]
    pmp = [s.get("pmp_components", {}).get("pmp") for s in states]
    if any(p is None or p.get("mask") is None for p in pmp):
        raise ReleaseError(f"{tag_dir} has no PMP mask: not a PMP run, or saved before Stage I ended")
    for r, p in enumerate(pmp):
        if (p["mask"]["rank"], p["mask"]["world_size"]) != (r, len(files)):
            raise ReleaseError(f"{files[r]}: holds the mask shard of rank {p['mask']['rank']} of "
                               f"{p['mask']['world_size']}, expected rank {r} of {len(files)}")
    return states, pmp


def _theta0_params(pmp: list[dict], shapes: Mapping[str, tuple]) -> Iterator[tuple[str, torch.Tensor]]:
    """Full θ(0) per parameter from each rank's fp32 sub-group snapshot, cut where the mask
    signature (name, numel, start, length, sub_group, offset) says its slice lives."""
    if any(p.get("theta0") is None for p in pmp):
        raise ReleaseError("this checkpoint holds no θ(0): Stage II checkpoints keep it only "
                           "with pmp.save_init (the complement alone is θ(0) there); export "
                           "without --init, or use the run's private/mask/init.safetensors")
    where = [{s[0]: s for s in p["mask"]["signature"]} for p in pmp]
    for name, shape in shapes.items():
        parts = []
        for p, w in zip(pmp, where):
            _, _, _, length, group, offset = w[name]
            parts.append(p["theta0"][group][offset:offset + length])
        yield name, torch.cat(parts).reshape(shape)


def _pmp_settings(tag_dir: Path) -> dict:
    """The run's PMP settings (mask_ratio, mask_source, exclude, complement, ...) from the tag's
    descriptor; older checkpoints recorded only `"pmp": true`, so nothing to add then."""
    from .checkpoint import DESCRIPTOR
    path = tag_dir / DESCRIPTOR
    pmp = json.loads(path.read_text()).get("pmp") if path.is_file() else None
    return dict(pmp) if isinstance(pmp, dict) else {}


def export_mask(tag_dir, private_dir, overwrite: bool = False, with_init: bool = False) -> Path:
    """The private artifact (and with `with_init` θ(0) as init.safetensors) from a checkpoint's
    per-rank client state, for a checkpoint of any world size."""
    tag_dir, private_dir = Path(tag_dir), Path(private_dir)
    _refuse_non_empty(private_dir, overwrite)
    states, pmp = _pmp_states(tag_dir)
    param_shapes = {n: tuple(s) for group in states[0]["param_shapes"] for n, s in group.items()}
    shapes = {s[0]: param_shapes[s[0]] for s in pmp[0]["mask"]["signature"]}  # canonical order
    discovery = pmp[0]["discovery"]
    meta = {**_pmp_settings(tag_dir), "source": f"checkpoint {tag_dir}", "world_size": len(pmp),
            "init_seed": pmp[0]["init_seed"], "mask_seed": pmp[0]["mask_seed"],
            "stage2_start_step": pmp[0]["stage2_start"],
            "discovery": None if discovery is None else {
                k: discovery[k] for k in ("steps", "stop_reason", "trace")}}
    write_artifact(private_dir, merge_mask_slices([p["mask"]["bits"] for p in pmp], shapes),
                   meta, overwrite=True)
    if with_init:
        plan = {private_dir / INIT_FILE: [(n, torch.float32, s) for n, s in shapes.items()]}
        _stream_safetensors(plan, _theta0_params(pmp, shapes))
    return private_dir


def reshard_mask(private_dir, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Per rank r of `world_size`: {name: packed ZeRO-3 slice}, each packed from its own bit 0
    (the checkpoint layout; merge_mask_slices inverts it). Fine-tuning at any world size uses it."""
    if world_size < 1:
        raise ReleaseError(f"world size must be at least 1, got {world_size}")
    try:
        tensors, meta = read_artifact(private_dir)
    except MaskArtifactError as e:
        raise ReleaseError(str(e)) from e
    out = [{} for _ in range(world_size)]
    for name, shape in meta["shapes"].items():
        full, numel = tensors[name], math.prod(shape)
        for r in range(world_size):
            out[r][name] = pack_bits(slice_for_rank(full, numel, r, world_size))
    return out


def write_resharded_mask(private_dir, world_size: int, out_dir, overwrite: bool = False) -> list[Path]:
    """rank{r}.safetensors (packed slices) per rank + layout.json (shapes, per-rank start/length),
    written beside `out_dir` and renamed into place: never a partial set of rank files."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    _refuse_non_empty(out_dir, overwrite)
    per_rank = reshard_mask(private_dir, world_size)
    _, meta = read_artifact(private_dir)
    layout = {"world_size": world_size, "release_sha256": meta.get("release_sha256"), "params": {}}
    for name, shape in meta["shapes"].items():
        cuts = [LocalSlice.for_rank(0, math.prod(shape), r, world_size) for r in range(world_size)]
        layout["params"][name] = {"shape": shape, "start": [c.start for c in cuts],
                                  "length": [c.length for c in cuts]}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for r, bits in enumerate(per_rank):
            save_file(bits, str(tmp / f"rank{r}.safetensors"),
                      metadata={"rank": str(r), "world_size": str(world_size)})
        (tmp / "layout.json").write_text(json.dumps(layout, indent=1))
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / f"rank{r}.safetensors" for r in range(world_size)]
