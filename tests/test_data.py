"""Data pipeline on real text: tokenizers, lossless packing into MDS shards, streaming loaders."""
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pmp_scale.data.loader as loader_mod
from helpers import REPO
from pmp_scale.data import (DataError, build_loader, iter_texts, load_tokenizer, prepare_dataset,
                            read_meta, train_sentencepiece)
from pmp_scale.data.prepare import _is_val

BOOK = REPO / "data" / "corpus" / "persuasion.txt.gz"
GPT2 = REPO / "data" / "tokenizers" / "gpt2-bpe"
SEQ_LEN = 64
SENTENCES = ["Anne Elliot walked to Uppercross.", "  two  spaces\tand a tab\nnew line",
             "Émile paid £12,345.67 — 日本語 🙂", "trailing space ", ""]


@pytest.fixture(autouse=True)
def single_process_streaming(monkeypatch):
    """Streaming reads the world from the environment: make it one local process. Skip its
    machine-wide stale-shm cleaner, which would unlink segments of concurrent test sessions."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.setenv(var, "")  # recorded, so a value the loader exports is undone too
        monkeypatch.delenv(var)
    monkeypatch.setattr(loader_mod, "_stale_shm_cleaned", True)


@pytest.fixture(scope="module")
def slice_txt(tmp_path_factory) -> Path:
    """The first ~120 kB of Persuasion, cut at a paragraph boundary."""
    with gzip.open(BOOK, "rt", encoding="utf-8") as f:
        text = f.read(120_000)
    path = tmp_path_factory.mktemp("corpus") / "persuasion_head.txt"
    path.write_text(text[: text.rindex("\n\n")] + "\n")
    return path


@pytest.fixture(scope="module")
def spm(slice_txt, tmp_path_factory) -> str:
    return train_sentencepiece([str(slice_txt)], str(tmp_path_factory.mktemp("tok") / "spm"), 512)


@pytest.fixture(scope="module")
def prepared(slice_txt, spm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "mds"
    prepare_dataset([str(slice_txt)], spm, out, seq_len=SEQ_LEN, val_fraction=0.1, seed=3,
                    progress=False)
    return out


def _samples(data: Path, split: str) -> np.ndarray:
    """All samples of a split in index order."""
    ds = build_loader(data, split, 1, shuffle=False, seed=0, drop_last=False).dataset
    return np.stack([ds[i]["tokens"] for i in range(len(ds))])


def _ids(loader, n=None) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


# --- text --------------------------------------------------------------------------------------
def test_iter_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffTitle\n\n\nFirst para\nwrapped here.\n  \nSecond.")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "doc one\n\nkept as is"}) + "\n\n")
        f.write(json.dumps({"text": "two"}) + "\n")
    assert list(iter_texts([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl.gz")])) == [
        "Title", "First para wrapped here.", "Second.", "doc one\n\nkept as is", "two"]
    with pytest.raises(FileNotFoundError, match="nothing"):
        list(iter_texts([str(tmp_path / "nothing*.txt")]))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataError, match="c.csv"):
        list(iter_texts([str(tmp_path / "c.csv")]))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        list(iter_texts([str(tmp_path / "bad.jsonl")]))


# --- tokenizers --------------------------------------------------------------------------------
def test_sentencepiece_roundtrip_and_fingerprint(spm, slice_txt, tmp_path):
    tok = load_tokenizer(spm)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    for text in SENTENCES:  # byte fallback: characters never seen in training still round-trip
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode_batch(SENTENCES) == [tok.encode(s) for s in SENTENCES]
    assert tok.encode_batch([]) == []
    assert tok.fingerprint() == hashlib.sha256(Path(spm).read_bytes()).hexdigest()
    assert load_tokenizer(spm).fingerprint() == tok.fingerprint()
    # Retraining elsewhere gives the same bytes, so the fingerprint names the tokenizer itself.
    again = train_sentencepiece([str(slice_txt)], str(tmp_path / "spm"), 512)
    assert Path(again).read_bytes() == Path(spm).read_bytes()
    other = train_sentencepiece([str(slice_txt)], str(tmp_path / "spm600"), 600)
    assert load_tokenizer(other).fingerprint() != tok.fingerprint()


def test_sentencepiece_save_hf_encodes_identically(spm, slice_txt, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(spm)
    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    texts = SENTENCES + list(iter_texts([str(slice_txt)]))[:50]
    assert [hf(t)["input_ids"] for t in texts] == tok.encode_batch(texts)
    assert hf.decode(tok.encode(SENTENCES[2])) == SENTENCES[2]
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, 3)


def test_gpt2_bpe_dir_and_save_hf(slice_txt, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(GPT2)
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    for text in SENTENCES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([]) == []
    meta = prepare_dataset([str(slice_txt)], GPT2, tmp_path / "mds", SEQ_LEN, progress=False)
    assert (meta["vocab_size"], meta["dtype"], meta["eos_id"]) == (50257, "uint16", 50256)
    assert _samples(tmp_path / "mds", "val").max() < 50257
    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert [hf(t)["input_ids"] for t in SENTENCES] == tok.encode_batch(SENTENCES)
    assert load_tokenizer(tmp_path / "hf").encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # a directory without tokenizer files
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="vocab.json"):
        load_tokenizer(tmp_path / "vocab.json")


# --- prepare -----------------------------------------------------------------------------------
def test_prepare_meta_matches_shards(prepared, spm, slice_txt):
    meta = read_meta(prepared)
    tok = load_tokenizer(spm)
    assert meta["format_version"] == 1 and meta["seq_len"] == SEQ_LEN
    assert (meta["vocab_size"], meta["dtype"], meta["eos_id"]) == (512, "uint16", 2)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint()
    assert meta["inputs"] == [str(slice_txt)]
    for split in ("train", "val"):
        index = json.loads((prepared / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == meta[f"num_{split}_samples"] > 0
        assert all(s["compression"] == "zstd" and s["column_encodings"] == ["ndarray:uint16"]
                   for s in index["shards"])
    packed = (meta["num_train_samples"] + meta["num_val_samples"]) * SEQ_LEN
    assert packed <= meta["num_tokens"] < packed + 2 * SEQ_LEN  # each split drops < one sample


def test_prepare_packing_is_lossless_and_splits_are_disjoint(prepared, spm, slice_txt):
    tok = load_tokenizer(spm)
    docs = list(iter_texts([str(slice_txt)]))
    in_val = [_is_val(d, 3, 0.1) for d in docs]
    assert 0.02 < np.mean(in_val) < 0.25
    for split, wanted in (("train", False), ("val", True)):
        picked = [d for d, v in zip(docs, in_val) if v == wanted]
        expected = [t for ids in tok.encode_batch(picked) for t in (*ids, tok.eos_id)]
        samples = _samples(prepared, split)
        assert samples.shape[1] == SEQ_LEN and samples.dtype == np.uint16
        stream = samples.reshape(-1).tolist()
        assert len(expected) - SEQ_LEN < len(stream) <= len(expected)  # only the tail is dropped
        assert stream == expected[: len(stream)]
        # Decoding the samples gives back the documents of this split, in order.
        texts = _split_at(stream, tok)
        assert texts == picked[: len(texts)] and len(texts) >= len(picked) - SEQ_LEN
    train, val = ({d for d, v in zip(docs, in_val) if v == w} for w in (False, True))
    assert train and val and not train & val


def _split_at(stream: list[int], tok) -> list[str]:
    """Complete documents in a packed stream (the last, cut one is left out)."""
    out, start = [], 0
    for i, t in enumerate(stream):
        if t == tok.eos_id:
            out.append(tok.decode(stream[start:i]))
            start = i + 1
    return out


def test_prepare_refuses_nonempty_out_dir_and_overwrites(prepared, spm, slice_txt, tmp_path):
    with pytest.raises(DataError, match="not empty.*overwrite"):
        prepare_dataset([str(slice_txt)], spm, prepared, SEQ_LEN, progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_dataset([str(slice_txt)], spm, tmp_path / "precious", SEQ_LEN, overwrite=True,
                        progress=False)
    out = tmp_path / "ds"
    first = prepare_dataset([str(slice_txt)], spm, out, 32, progress=False)
    second = prepare_dataset([str(slice_txt)], spm, out, SEQ_LEN, seed=3, val_fraction=0.1,
                             overwrite=True, progress=False)
    assert read_meta(out) == second != first
    assert second == read_meta(prepared) | {"inputs": second["inputs"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "precious"]  # no temp dirs left
    with pytest.raises(DataError, match="no complete sample"):
        prepare_dataset([str(slice_txt)], spm, tmp_path / "long", 100_000, progress=False)
    assert not (tmp_path / "long").exists()


# --- loader ------------------------------------------------------------------------------------
def test_loader_batches_and_deterministic_shuffle(prepared):
    meta = read_meta(prepared)
    batches = _ids(build_loader(prepared, "train", 4, shuffle=False, seed=0))
    assert len(batches) == meta["num_train_samples"] // 4
    assert all(b.shape == (4, SEQ_LEN) and b.dtype == torch.int64 for b in batches)
    assert 0 <= min(b.min() for b in batches) and max(b.max() for b in batches) < 512
    unshuffled = torch.cat(batches)
    assert torch.equal(unshuffled, torch.from_numpy(_samples(prepared, "train").astype(np.int64))[
        : len(unshuffled)])

    loader = build_loader(prepared, "train", 4, shuffle=True, seed=7)
    epoch1, epoch2 = torch.cat(_ids(loader)), torch.cat(_ids(loader))  # iterating again: epoch 2
    assert torch.equal(epoch1, torch.cat(_ids(build_loader(prepared, "train", 4, shuffle=True,
                                                           seed=7))))
    other_seed = torch.cat(_ids(build_loader(prepared, "train", 4, shuffle=True, seed=8)))
    assert not torch.equal(epoch1, other_seed) and not torch.equal(epoch1, unshuffled)
    assert not torch.equal(epoch1, epoch2)
    every = {tuple(row) for row in _samples(prepared, "train").tolist()}
    for epoch in (epoch1, epoch2):  # each epoch: distinct samples, all but the last batch's worth
        rows = {tuple(row) for row in epoch.tolist()}
        assert len(rows) == len(epoch) > len(every) - 4 and rows <= every


def test_loader_resumes_mid_epoch(prepared):
    def make():
        return build_loader(prepared, "train", 4, shuffle=True, seed=11)

    reference = _ids(make())
    interrupted = make()
    consumed = _ids(interrupted, 5)
    state = interrupted.state_dict()
    assert state["sample_in_epoch"] == 20 and state["epoch"] == 0
    resumed = make()
    resumed.load_state_dict(state)  # before the first iteration
    rest = _ids(resumed)
    assert len(consumed) + len(rest) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(consumed + rest, reference))


def test_train_and_val_loaders_coexist(prepared, tmp_path):
    """Two live datasets in one process (the trainer holds train and val), read in place or
    through a local cache (the remote code path, with a local path as the 'remote')."""
    for cache in (None, tmp_path / "cache"):
        train = iter(build_loader(prepared, "train", 2, shuffle=True, seed=0, local_cache=cache))
        val = iter(build_loader(prepared, "val", 2, shuffle=False, seed=0, local_cache=cache))
        for _ in range(3):
            assert next(train)["input_ids"].shape == next(val)["input_ids"].shape == (2, SEQ_LEN)
    assert (tmp_path / "cache" / "train" / "index.json").is_file()
    assert (tmp_path / "cache" / "val" / "index.json").is_file()


def test_loader_takes_local_world_size_from_deepspeed_launcher(prepared, monkeypatch):
    """Streaming sees the launcher's LOCAL_SIZE as its local world size when it detects its
    world; the process environment is never written, and streaming is as it was after."""
    from streaming.base import distributed
    from streaming.base.world import World
    seen = []

    def spying(cls):  # what streaming is told, then the single-process world this test has
        seen.append((distributed.get_local_world_size(), dict(os.environ)))
        return cls(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
    monkeypatch.setattr(World, "detect", classmethod(spying))
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = dict(os.environ)
    build_loader(prepared, "val", 2, shuffle=False, seed=0)
    assert seen[:1] == [(2, before)]
    assert distributed.get_local_world_size() == 1
    assert dict(os.environ) == before


def test_missing_or_bad_data_dir(tmp_path, prepared):
    missing = tmp_path / "not_prepared"
    with pytest.raises(DataError, match=f"data directory not found: {missing}.*prepare_data"):
        build_loader(missing, "train", 2, shuffle=False, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="meta.json"):
        read_meta(tmp_path / "empty")
    with pytest.raises(DataError, match="split 'test'"):
        build_loader(prepared, "test", 2, shuffle=False, seed=0)


# --- command lines -----------------------------------------------------------------------------
def test_clis(slice_txt, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from tools import prepare_data, train_tokenizer

    assert train_tokenizer.main(["--input", str(slice_txt), "--vocab-size", "400", "--out",
                                 str(tmp_path / "tok" / "spm"), "--quiet"]) == 0
    assert "vocab 400" in capsys.readouterr().out
    args = ["--input", str(slice_txt), "--tokenizer", str(tmp_path / "tok" / "spm.model"),
            "--out", str(tmp_path / "mds"), "--seq-len", "128", "--quiet"]
    assert prepare_data.main(args) == 0
    meta = read_meta(tmp_path / "mds")
    assert f"{meta['num_train_samples']:,} train" in capsys.readouterr().out
    assert prepare_data.main(args) == 2  # refuses to overwrite: one clear line, no traceback
    assert "--overwrite" in capsys.readouterr().err
    assert prepare_data.main(args + ["--overwrite"]) == 0


def _corrupt_copy(tmp_path, tiny_data):
    import shutil
    data = tmp_path / "mds"
    shutil.copytree(tiny_data["data"], data)
    for raw in data.glob("train/*.mds"):
        raw.unlink()  # decompressed copies from earlier reads
    shard = sorted(data.glob("train/*.mds.zstd"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    return data


def test_corrupt_shard_is_a_clear_error(tmp_path, tiny_data):
    """A flipped byte in a compressed shard fails its checksum when the shard is loaded."""
    from pmp_scale.data import DataError, batches, build_loader
    loader = build_loader(str(_corrupt_copy(tmp_path, tiny_data)), "train", 2, shuffle=False,
                          seed=0)
    with pytest.raises(DataError, match=r"corrupt data shard: .*shard\.00000\.mds\.zstd does not "
                                        r"match the checksum in its index\.json"):
        for _ in batches(loader, epochs=1):
            pass


def test_reader_waiting_for_a_shard_that_fails_is_released(tmp_path, tiny_data):
    """Streaming alone leaves a failed shard PREPARING and its waiting reader spins forever."""
    import signal
    import threading
    from streaming.base.dataset import _ShardState
    from pmp_scale.data import build_loader
    dataset = build_loader(str(_corrupt_copy(tmp_path, tiny_data)), "train", 2, shuffle=False,
                           seed=0).dataset
    dataset._shard_states[0] = _ShardState.PREPARING  # another thread is preparing it ...

    def failing_preparer():
        with pytest.raises(DataError):
            dataset.streams[0].prepare_shard(dataset.shards[0])  # ... and fails
    threading.Timer(0.5, failing_preparer).start()
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reader hung on a failed shard"))
    signal.alarm(30)
    try:
        with pytest.raises(DataError, match="corrupt data shard: .* does not match the checksum"):
            dataset.get_item(0)
    finally:
        signal.alarm(0)


def test_both_epoch_threads_failing_on_one_shard_end_the_epoch(tmp_path, tiny_data):
    """The hang of a corrupt remote shard: streaming's epoch end waits until its download-ahead
    and wait-until-ready threads have returned, and a thread that raises never returns.
    Planted: the wait-until-ready thread fetches the corrupt shard first, and the download-ahead
    thread is let in while that failure is on its way out (a loaded machine's interleaving)."""
    import threading
    from pmp_scale.data import batches
    loader = build_loader(str(_corrupt_copy(tmp_path, tiny_data)), "train", 2, shuffle=False,
                          seed=0, local_cache=str(tmp_path / "cache"))
    dataset, stream = loader.dataset, loader.dataset.streams[0]
    first_failed, retried = threading.Event(), threading.Event()
    ahead, prepare = dataset._prepare_thread, stream.prepare_shard

    def ahead_after_the_first_failure(it):
        first_failed.wait(60)
        return ahead(it)

    def prepare_then_linger(shard):
        if first_failed.is_set():
            retried.set()
        try:
            return prepare(shard)
        except Exception:
            if not first_failed.is_set():
                first_failed.set()
                retried.wait(2)  # streaming alone: the other thread retries the shard now
            raise
    dataset._prepare_thread = ahead_after_the_first_failure
    stream.prepare_shard = prepare_then_linger
    with pytest.raises(DataError) as err:
        for _ in batches(loader, epochs=1):
            pass
    assert str(err.value).startswith(f"corrupt data shard: {tmp_path / 'cache'}/train/shard.00000"
                                     ".mds.zstd (downloaded from "), err.value
    assert "\n" not in str(err.value)


def test_corrupt_shard_in_a_dataloader_worker_is_a_clear_error(tmp_path, tiny_data):
    """In a worker process the failure used to end the epoch early without a word."""
    from pmp_scale.data import batches
    loader = build_loader(str(_corrupt_copy(tmp_path, tiny_data)), "train", 2, shuffle=False,
                          seed=0, num_workers=1)
    with pytest.raises(DataError) as err:
        for _ in batches(loader, epochs=1):
            pass
    assert str(err.value).startswith("corrupt data shard: "), err.value
    assert "\n" not in str(err.value)
