"""A decompressed shard corrupted on disk: repaired from its compressed twin, or one clear line.

Streaming trusts a decompressed `shard.NNNNN.mds` it finds on disk; with a flipped byte in its
offset table training ran on and died ~50 steps later with streaming's raw
`IndexError: Relative sample index ... is not present`.
"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

import pmp_scale.data.loader as loader_mod
from pmp_scale.data import DataError, batches, build_loader


@pytest.fixture(autouse=True)
def single_process_streaming(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(loader_mod, "_stale_shm_cleaned", True)


def _read_all(data, **kw) -> torch.Tensor:
    loader = build_loader(str(data), "train", 2, shuffle=False, seed=0, **kw)
    return torch.cat([b["input_ids"] for b in batches(loader, epochs=1)])


def _flip_offsets(raw) -> bytes:
    """Bytes in the shard's offset table: sample boundaries point into nowhere."""
    blob = bytearray(raw.read_bytes())
    good = bytes(blob)
    for i in range(8, 40):
        blob[i] ^= 0xFF
    raw.write_bytes(bytes(blob))
    return good


def test_corrupt_decompressed_shard_is_restored_from_its_twin(tmp_path, tiny_data, caplog):
    data = tmp_path / "mds"
    shutil.copytree(tiny_data["data"], data)
    clean = _read_all(data)  # decompresses shard.00000.mds beside its .zstd twin
    raw = sorted(data.glob("train/*.mds"))[0]
    good = _flip_offsets(raw)
    with caplog.at_level(logging.WARNING, logger="pmp_scale"):
        assert torch.equal(_read_all(data), clean)
    assert raw.read_bytes() == good
    assert any(f"corrupt data shard: {raw} does not match the checksum in its index.json; "
               "restored it from its compressed copy shard.00000.mds.zstd" in r.message
               for r in caplog.records), caplog.text

    # node-local cache of a "remote" dataset: the twin was dropped after decompression and is
    # fetched again from the remote
    cache = tmp_path / "cache"
    assert torch.equal(_read_all(data, local_cache=str(cache)), clean)
    cached = sorted(cache.glob("train/*.mds"))[0]
    assert not list(cache.glob("train/*.zstd"))
    _flip_offsets(cached)
    assert torch.equal(_read_all(data, local_cache=str(cache)), clean)
    assert cached.read_bytes() == good


def test_corrupt_decompressed_shard_without_a_good_twin_is_one_clear_error(tmp_path, tiny_data):
    data = tmp_path / "mds"
    shutil.copytree(tiny_data["data"], data)
    _read_all(data)
    raw = sorted(data.glob("train/*.mds"))[0]
    _flip_offsets(raw)
    twin = raw.with_name(raw.name + ".zstd")
    blob = bytearray(twin.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # the twin is corrupt too
    twin.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        _read_all(data)
    message = str(err.value)
    assert message.startswith(f"corrupt data shard: {raw} does not match the checksum in its "
                              f"index.json, and it could not be restored from {twin} "
                              "(Checksum failure: "), message
    assert "\n" not in message
