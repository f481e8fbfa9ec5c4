"""What a publisher checks before uploading a release: nothing private in it, and it loads.

Static checks (file names and types, safetensors headers, configs) run on every release before
it is renamed into place; `check_release` also loads and runs it the way its users will, finds
exact mask channels in the weights' own statistics, and checks a private artifact's binding
(sha256) and the frozen complement against θ(0). The full audit adds the data-free
mask-recovery attacks on top: `secrecy.audit_release` (the attacks sit above release/).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..mask.artifact import INIT_FILE, META_FILE, MaskArtifactError, read_artifact
from ..mask.bits import unpack_bits
from ..stream_safetensors import DTYPE_CODES, digest_update, read_header
from ..zero3.build import DTYPES
from .channels import release_channels
from .locate import ReleaseError

INDEX_FILE = "model.safetensors.index.json"
# What may never appear in a file name, tensor name, config key or safetensors metadata key.
FORBIDDEN = re.compile(r"mask|optim|rng|seed|zero_pp|theta0|theta_0|exp_avg|pmp|private", re.I)
_CONFIGS = ("config.json", "generation_config.json", "tokenizer_config.json",
            "special_tokens_map.json")
_KNOWN_FILES = {*_CONFIGS, INDEX_FILE, "tokenizer.json", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "README.md", "LICENSE"}
_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_PICKLES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"}
_FLOAT_CODES = {DTYPE_CODES[d] for d in DTYPES.values()}  # what a release may hold
_INDEX_METADATA = {"total_size", "total_parameters"}


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
                header = read_header(path)
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
        files = {n: "model.safetensors" for n in read_header(root / "model.safetensors")
                 if n != "__metadata__"}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(root / f), framework="pt"))
                   for f in sorted(set(files.values()))}
        for name in sorted(files):
            yield name, handles[files[name]].get_tensor(name)


def release_sha256(release_dir) -> str:
    """The sha256 that binds a private artifact to its release (stream_safetensors.digest_update)."""
    digest = hashlib.sha256()
    for name, t in release_tensors(release_dir):
        digest_update(digest, name, t)
    return digest.hexdigest()


def int_view(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern as integers: exact comparison, -0.0 != 0.0 and NaN == NaN by bits."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)  # each one fails the audit
    report: list[str] = field(default_factory=list)    # informational lines
    bound: bool = False  # the private artifact belongs to this release: attacks can be scored


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
            digest_update(digest, name, t)
            channels += release_channels(name, t)
            if init is not None and name in masks:
                frozen = ~unpack_bits(masks[name], t.numel())
                theta0 = init.get_tensor(name).to(t.dtype).reshape(-1)
                moved = int((int_view(t.reshape(-1)) != int_view(theta0))[frozen].sum())
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


def check_release(release_dir, private_dir=None, load: bool = True) -> Audit:
    """Every check of the audit but the attacks (`secrecy.audit_release` runs them after)."""
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
                    line += f" metadata {read_header(path).get('__metadata__')}"
            audit.report.append(line)
    if load:
        _load_and_generate(root, audit)
    if not any(_WEIGHTS.match(p.name) for p in root.iterdir()):
        return audit
    audit.bound = _scan_tensors(root, Path(private_dir) if private_dir is not None else None, audit)
    return audit

