"""Stage III: a ZeRO-3 checkpoint → a standard, mask-free Hugging Face model, and its audit.

A release must look like any other pre-trained model: dense weights, an HF config, a tokenizer.
Everything else a checkpoint holds reveals the mask (optimizer moments are exactly zero on the
complement; seeds and θ(0) regenerate it; RNG and data state are private too; docs/design.md "Mask
secrecy"). Weights are rebuilt with DeepSpeed's own lazy ZeRO-3 reconstruction and streamed one
tensor at a time into safetensors shards whose headers are planned up front, so memory stays
bounded by the largest tensor, at any model size and any world size.

    locate   which tag a path means, whether it is whole, its weights read lazily
    publish  the release directory, and its binding (sha256) to the private mask artifact
    audit    what a publisher checks before uploading: names, headers, channels, θ(0) (the
             attacks on top are secrecy.audit_release)
    channels the exact mask channels a release is refused for
    export   the private side: the mask exported from a checkpoint, re-sliced for any world size

The safetensors writer is pmp_scale/stream_safetensors.py.
"""
from .audit import (INDEX_FILE, Audit, audit_files, check_release, int_view, release_sha256,
                    release_tensors)
from .locate import ReleaseError, lazy_state_dict, rank_files, resolve_checkpoint
from .publish import DTYPES, record_release, release_checkpoint

__all__ = [
    "DTYPES", "INDEX_FILE", "Audit", "ReleaseError", "audit_files", "check_release",
    "int_view", "lazy_state_dict", "rank_files", "record_release", "release_checkpoint",
    "release_sha256", "release_tensors", "resolve_checkpoint",
]
