"""Private mask artifact: merge, re-slice for other world sizes, round trip, corruption; the
streaming safetensors writer it shares with releases; saved rank shards joined back (SavedShards)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pmp_scale.mask import (MaskArtifactError, merge_rank_slices, pack_bits, read_artifact,
                            reslice_artifact, slice_for_rank, write_artifact)
from pmp_scale.mask.sharded import SavedShards, ShardedMask
from pmp_scale.zero3.layout import LocalSlice, ParamEntry, PartitionLayout
from pmp_scale.stream_safetensors import read_header, write_planned, write_unplanned

SHAPES = {"embed.weight": (37, 11), "norm.weight": (3,), "bias": (1,), "layers.0.w": (2, 4), "lm_head": (1001,)}


@pytest.fixture
def full_masks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(shape, generator=g) < 0.6 for name, shape in SHAPES.items()}


def _numpy_packed(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def _rank_slices(mask: torch.Tensor, world_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Packed per-rank ZeRO-3 slices, each packed from its own bit 0, as the engine saves them."""
    flat = mask.flatten()
    slices = [LocalSlice.for_rank(0, flat.numel(), r, world_size) for r in range(world_size)]
    return [pack_bits(flat[s.start: s.start + s.length]) for s in slices], [s.length for s in slices]


def _write(path, full_masks, **kw):
    items = ((n, _numpy_packed(m), tuple(m.shape)) for n, m in full_masks.items())
    write_artifact(path, items, {"rho": 0.6, "source": "test"}, **kw)


def test_merge_of_rank_slices_equals_numpy_packbits(full_masks):
    for name, mask in full_masks.items():
        bits, lengths = _rank_slices(mask, 2)
        assert torch.equal(merge_rank_slices(bits, lengths), _numpy_packed(mask)), name


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_reslice_then_merge_is_byte_identical(tmp_path, full_masks, world_size):
    _write(tmp_path / "mask", full_masks)
    per_rank = [reslice_artifact(tmp_path / "mask", list(SHAPES), r, world_size) for r in range(world_size)]
    for name, mask in full_masks.items():
        numel = mask.numel()
        pieces = [p[name] for p in per_rank]
        assert [len(p) for p in pieces] == [LocalSlice.for_rank(0, numel, r, world_size).length
                                           for r in range(world_size)]
        merged = merge_rank_slices([pack_bits(p) for p in pieces], [len(p) for p in pieces])
        assert torch.equal(merged, _numpy_packed(mask)), name
        assert all(torch.equal(slice_for_rank(merged, numel, r, world_size), pieces[r])
                   for r in range(world_size))


def test_write_read_round_trip(tmp_path, full_masks):
    _write(tmp_path / "mask", full_masks)
    tensors, meta = read_artifact(tmp_path / "mask")
    assert list(tensors) == list(SHAPES)
    for name, mask in full_masks.items():
        assert torch.equal(tensors[name], _numpy_packed(mask))
    # a standard safetensors reader accepts the streamed file
    assert set(load_file(tmp_path / "mask" / "mask.safetensors")) == set(SHAPES)
    assert meta["rho"] == 0.6 and meta["source"] == "test" and meta["format_version"] == 1
    assert meta["shapes"] == {n: list(s) for n, s in SHAPES.items()}
    assert meta["selected"] == {n: int(m.sum()) for n, m in full_masks.items()}
    assert meta["total_selected"] == sum(int(m.sum()) for m in full_masks.values())
    assert meta["total_numel"] == sum(m.numel() for m in full_masks.values())


def test_write_refuses_to_overwrite_and_is_atomic(tmp_path, full_masks):
    _write(tmp_path / "mask", full_masks)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(tmp_path / "mask", full_masks)
    smaller = {"bias": full_masks["bias"]}
    _write(tmp_path / "mask", smaller, overwrite=True)
    assert list(read_artifact(tmp_path / "mask")[0]) == ["bias"]

    def failing():
        yield "bias", _numpy_packed(full_masks["bias"]), (1,)
        raise RuntimeError("engine died mid-stream")
    with pytest.raises(RuntimeError, match="mid-stream"):
        write_artifact(tmp_path / "other", failing(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask"]  # no partial dir, no temp left


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="padding bits"):
        write_artifact(tmp_path / "a", [("w", torch.tensor([0xFF], dtype=torch.uint8), (3,))], {})
    with pytest.raises(ValueError, match="expected \\[2\\]"):
        write_artifact(tmp_path / "a", [("w", torch.zeros(1, dtype=torch.uint8), (9,))], {})
    with pytest.raises(ValueError, match="duplicate"):
        write_artifact(tmp_path / "a", [("w", torch.zeros(1, dtype=torch.uint8), (2,))] * 2, {})


def _corrupt(path, edit):
    tensors = load_file(path / "mask.safetensors")
    edit(tensors)
    save_file(tensors, path / "mask.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"lm_head": t["lm_head"][:-1]}), r"'lm_head' \[1001\]: shape \[125\], expected \[126\]"),
    (lambda t: t.pop("norm.weight"), r"missing \['norm.weight'\]"),
    (lambda t: t.update({"extra": torch.zeros(1, dtype=torch.uint8)}), r"unexpected \['extra'\]"),
    (lambda t: t.update({"bias": t["bias"].to(torch.int16)}), r"'bias' \[1\]: dtype I16, expected uint8"),
    (lambda t: t.update({"norm.weight": torch.tensor([0xFF], dtype=torch.uint8)}), "padding bits"),
])
def test_corrupt_artifact_raises_mask_artifact_error(tmp_path, full_masks, edit, message):
    _write(tmp_path / "mask", full_masks)
    _corrupt(tmp_path / "mask", edit)
    with pytest.raises(MaskArtifactError, match=message) as err:
        read_artifact(tmp_path / "mask")
    assert "mask.safetensors" in str(err.value)
    with pytest.raises(ValueError):  # MaskArtifactError is a ValueError
        reslice_artifact(tmp_path / "mask", list(SHAPES), 0, 2)


def test_bad_metadata_and_missing_names(tmp_path, full_masks):
    _write(tmp_path / "mask", full_masks)
    with pytest.raises(MaskArtifactError, match="no mask for \\['absent'\\]"):
        reslice_artifact(tmp_path / "mask", ["bias", "absent"], 0, 1)
    meta_path = tmp_path / "mask" / "mask.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 2}))
    with pytest.raises(MaskArtifactError, match="mask.json: expected format_version 1"):
        read_artifact(tmp_path / "mask")
    meta_path.unlink()
    with pytest.raises(MaskArtifactError, match="mask.json: cannot read"):
        read_artifact(tmp_path / "mask")


def test_streamed_safetensors_read_back(tmp_path):
    """Both writers produce files safetensors reads; no scratch file is left behind."""
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.uint8),
               "c": torch.randn(2, dtype=torch.bfloat16)}
    plan = {tmp_path / "planned.safetensors": [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]}
    write_planned(plan, tensors.items())
    write_unplanned(tmp_path / "unplanned.safetensors", tensors.items(), metadata=None)
    for name, metadata in (("planned", {"format": "pt"}), ("unplanned", None)):
        back = load_file(tmp_path / f"{name}.safetensors")
        assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
        assert read_header(tmp_path / f"{name}.safetensors").get("__metadata__") == metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planned.safetensors", "unplanned.safetensors"]


def _saved_ranks(full_masks, theta0, world_size) -> tuple[list[PartitionLayout], list[dict]]:
    """Each rank's layout and saved PMP state ({"mask", "theta0"}) in a W-rank run with one sub-group."""
    layouts, states = [], []
    for r in range(world_size):
        entries, offset = [], 0
        for i, (name, mask) in enumerate(full_masks.items()):
            per_rank = -(-mask.numel() // world_size)
            entries.append(ParamEntry(name, tuple(mask.shape),
                                      LocalSlice.for_rank(i, mask.numel(), r, world_size), 0, offset,
                                      per_rank))
            offset += per_rank
        layout, flat = PartitionLayout(entries, [offset], r, world_size), torch.zeros(offset)
        for e in entries:
            flat[e.offset:e.offset + e.slice.length] = \
                theta0[e.name].flatten()[e.slice.start:e.slice.start + e.slice.length]
        local = [full_masks[e.name].flatten()[e.slice.start:e.slice.start + e.slice.length]
                 for e in entries]
        layouts.append(layout)
        states.append({"mask": ShardedMask.from_param_masks(layout, local).state_dict(),
                       "theta0": [flat]})
    return layouts, states


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_saved_shards_join_back_whole_parameters(full_masks, world_size):
    g = torch.Generator().manual_seed(1)
    theta0 = {n: torch.randn(m.shape, generator=g) for n, m in full_masks.items()}
    layouts, states = _saved_ranks(full_masks, theta0, world_size)
    # checkpoints hold plain tuples: they load without the SliceLocation class
    assert all(type(row) is tuple for s in states for row in s["mask"]["signature"])
    for layout, state in zip(layouts, states):
        ShardedMask.from_state_dict(layout, state["mask"])  # the saved rows match the layout's
    saved = SavedShards(states)
    assert saved.names == list(full_masks) and saved.has_theta0
    for name, mask in full_masks.items():
        assert torch.equal(saved.packed_mask(name), _numpy_packed(mask)), name
        assert torch.equal(saved.theta0(name), theta0[name].flatten()), name
