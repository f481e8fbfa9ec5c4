"""A ZeRO-3 checkpoint tag written as a standard, mask-free Hugging Face model directory.

The weights come from DeepSpeed's lazy reconstruction (locate) and are streamed one tensor at a
time into safetensors shards split the HF way, so memory stays bounded by the largest tensor.
The release's sha256 is computed on the way and recorded in the private artifact's mask.json,
binding the two; a release whose weights would give the mask away is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..mask.artifact import MaskArtifactError, read_artifact, staged_directory, update_metadata
from ..stream_safetensors import digest_update, write_planned
from ..zero3.build import DTYPES
from .audit import INDEX_FILE, audit_files
from .channels import release_channels
from .locate import ReleaseError, lazy_state_dict, page_out, refuse_non_empty


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
            digest_update(digest, name, t)
            channels.extend(release_channels(name, t))
            yield name, t
            bar.update(t.numel() * t.element_size())
            del t
            page_out(lazy)
    with bar:
        write_planned(plan, tensors())
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(math.prod(lazy[n].shape) for n in names),
                              **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return digest.hexdigest(), channels


def _write_config_and_tokenizer(hf_dir: Path, out: Path, dtype: torch.dtype) -> None:
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
    update_metadata(private_dir, release_sha256=sha256, release_dtype=dtype)


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
    refuse_non_empty(out_dir, overwrite)
    if not (hf_dir / "config.json").is_file():
        raise ReleaseError(f"{hf_dir} has no config.json: the release needs the HF description "
                           "the trainer writes beside each checkpoint (<tag>/hf)")
    lazy = lazy_state_dict(tag_dir)
    if private_dir is not None:
        _check_private_matches(Path(private_dir), lazy)
    with staged_directory(out_dir) as tmp:
        _write_config_and_tokenizer(hf_dir, tmp, DTYPES[dtype])
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
    if private_dir is not None:
        record_release(private_dir, sha256, dtype)
    return sha256
