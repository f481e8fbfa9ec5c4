"""Stream prepared MDS shards into training batches with resumable, rank-aware order.

mosaicml-streaming does the sharding across ranks, deterministic shuffling, and mid-epoch resume
(its order depends on `num_canonical_nodes` and the seed, not on the number of ranks). It reads
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment; what it needs from
its internals goes through `pmp_scale.ds_internals`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import ds_internals
from ..errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataError(UserError, ValueError):
    """The data is missing, malformed, or does not fit the run."""


def _is_remote(uri: str) -> bool:
    return "://" in str(uri)


def _join(uri: str, *parts: str) -> str:
    if _is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *parts])
    return os.path.join(uri, *parts)


def read_meta(data_uri: str) -> dict:
    """meta.json of a prepared dataset: a local directory or a remote URI (s3://, gs://, ...)."""
    data_uri = os.fspath(data_uri)
    if _is_remote(data_uri):
        from streaming.base.storage import CloudDownloader

        url = _join(data_uri, "meta.json")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "meta.json")
            try:
                CloudDownloader.direct_download(url, local)
            except Exception as err:  # each cloud client raises its own types
                raise DataError(_remote_problem(url, err)) from None
            meta = json.loads(Path(local).read_text())
    else:
        path = Path(data_uri)
        if not path.is_dir():
            raise DataError(f"data directory not found: {path} (run tools/prepare_data.py first)")
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{meta_file} not found: {path} is not a prepared dataset "
                            f"(run tools/prepare_data.py)")
        meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{data_uri}: data format version {meta.get('format_version')}, this "
                        f"code reads version {FORMAT_VERSION}; prepare the data again")
    return meta


def _remote_problem(url: str, err: BaseException) -> str:
    """One line on why `url` cannot be read. For s3:// the object and its bucket are asked
    directly, so that a missing bucket and refused credentials are told apart from a missing
    object (streaming says "not found" for all three)."""
    text = str(err).strip()
    generic = f"cannot fetch {url}: {text.splitlines()[0] if text else type(err).__name__}"
    if not url.startswith("s3://"):
        return generic
    bucket, _, key = url[len("s3://"):].partition("/")
    try:
        import boto3
        from botocore.exceptions import ClientError, NoCredentialsError
    except ImportError:
        return generic
    s3 = boto3.session.Session().client(  # a fresh session: the environment as it is now
        "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)

    def status(call) -> int | None:
        try:
            call()
            return 200
        except ClientError as e:
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    try:
        found = status(lambda: s3.head_object(Bucket=bucket, Key=key))
        if found in (400, 401, 403):
            return (f"cannot read {url}: access refused (HTTP {found}): check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                    f"policy of bucket {bucket!r}")
        if found == 404:
            if status(lambda: s3.head_bucket(Bucket=bucket)) == 404:
                return f"cannot read {url}: bucket {bucket!r} does not exist"
            return (f"cannot read {url}: no such object in bucket {bucket!r} (is the data path "
                    "right? tools/prepare_data.py writes meta.json beside train/ and val/)")
    except NoCredentialsError:
        return (f"cannot read {url}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    except Exception:  # endpoint unreachable and the like: the original message says it
        pass
    return generic


def _collate(samples: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    tokens = np.stack([s["tokens"] for s in samples])
    if tokens.shape[1] != seq_len:
        raise DataError(f"sample of {tokens.shape[1]} tokens in data prepared for {seq_len}")
    return {"input_ids": torch.from_numpy(tokens.astype(np.int64))}


_stale_shm_cleaned = False


def _clean_stale_shm_once() -> None:
    """Unlink shared memory left by crashed runs, once per process.

    Streaming's cleaner unlinks *every* streaming segment on the machine (local rank 0 does it,
    the others wait at a barrier, so all ranks must call it). A second call in this process would
    destroy the segments of the loaders built before it, hence once. Consequence: two training
    jobs must not start on one machine at the same time.
    """
    global _stale_shm_cleaned
    if not _stale_shm_cleaned:
        ds_internals.clean_stale_shared_memory()
        _stale_shm_cleaned = True


def default_cache_dir(data_uri: str) -> str:
    """Where shards of a remote dataset are cached when no local_cache is given: stable per URI,
    so a restarted run reuses the shards it already downloaded."""
    digest = hashlib.blake2s(str(data_uri).encode(), digest_size=8).hexdigest()
    return os.path.join(tempfile.gettempdir(), "pmp_scale-data", digest)


def build_loader(data_uri: str, split: str, micro_batch_size: int, *, shuffle: bool, seed: int,
                 num_canonical_nodes: int | None = None, local_cache: str | None = None,
                 num_workers: int = 0, drop_last: bool = True):
    """A `streaming.StreamingDataLoader` yielding {"input_ids": LongTensor[B, seq_len]}.

    A local directory is read in place (compressed shards are decompressed beside themselves, so
    it must be writable). A remote URI (s3://, gs://, ...), or any path when `local_cache` is
    given, is copied shard by shard into `local_cache`/<split> (default: `default_cache_dir`).

    Iterating again after an epoch ends starts the next epoch (a new order when shuffling).
    Mid-epoch resume: `state = loader.state_dict()` (on any rank; it counts samples of all ranks),
    and on a NEW loader call `loader.load_state_dict(state)` BEFORE its first iteration; loaded
    after the dataset has started an epoch it is silently ignored for that epoch. The order is
    fixed by (seed, num_canonical_nodes); keep both when resuming, even on another world size.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    data_uri = os.fspath(data_uri)
    meta = read_meta(data_uri)
    with ds_internals.launcher_local_world_size():
        _clean_stale_shm_once()
        dataset = _dataset(data_uri, split, micro_batch_size, shuffle, seed, num_canonical_nodes,
                           local_cache)
    from streaming import StreamingDataLoader
    return StreamingDataLoader(dataset, batch_size=micro_batch_size, num_workers=num_workers,
                               drop_last=drop_last,
                               collate_fn=functools.partial(_collate, seq_len=meta["seq_len"]))


def _dataset(data_uri: str, split: str, micro_batch_size: int, shuffle: bool, seed: int,
             num_canonical_nodes: int | None, local_cache: str | None):
    """The StreamingDataset of one split, with its shard checks installed."""
    from streaming import StreamingDataset

    if local_cache is not None or _is_remote(data_uri):
        cache = os.fspath(local_cache) if local_cache is not None else default_cache_dir(data_uri)
        remote, local = _join(data_uri, split), os.path.join(cache, split)
    else:
        remote, local = None, os.path.join(data_uri, split)
    # Every compressed shard is checked against index.json when it is (down)loaded: a
    # corrupt shard fails loudly (see `batches`) instead of feeding garbage tokens.
    dataset = StreamingDataset(remote=remote, local=local, batch_size=micro_batch_size,
                               shuffle=shuffle, shuffle_seed=seed,
                               num_canonical_nodes=num_canonical_nodes, validate_hash="xxh64")
    _record_background_failures(dataset)
    ds_internals.check_on_first_read(dataset, _check_raw_shard)
    ds_internals.remove_filelocks_at_exit(dataset)
    return dataset


def _record_background_failures(dataset) -> None:
    """A shard that fails to load (e.g. its checksum) ends the epoch with a DataError naming it,
    instead of a hang or an epoch that silently ends early."""
    def error(err: BaseException, stream) -> DataError:
        remote = stream is not None and stream.remote and _join(stream.remote, stream.split or "")
        return _data_error(err, remote or None)
    ds_internals.record_shard_failures(dataset, error)


def _check_raw_shard(shard, stream) -> None:
    """Check a decompressed shard against its index.json checksum before its first sample.

    Streaming validates only what it downloads or decompresses itself; a decompressed
    `shard.NNNNN.mds` already on disk (from an earlier run, or a corrupt copy in a cache) is
    trusted as is, and corrupt bytes surface many steps later as a raw IndexError from deep
    inside streaming. Each shard is hashed once per process, on first use (xxh64: milliseconds
    per 32 MB shard). A corrupt one is rebuilt from its compressed twin (fetched again from the
    remote when the cache dropped it), whose own checksum streaming verifies; without a good
    twin it is a DataError naming the file."""
    import logging
    from streaming.base.hashing import get_hash

    for raw_info, zip_info in shard.file_pairs:
        raw = os.path.join(shard.dirname, shard.split, raw_info.basename)
        algo = next((a for a in ("xxh64", "sha1") if a in (raw_info.hashes or {})), None)
        if algo is None or not os.path.isfile(raw):
            continue  # nothing to check against, or streaming will fetch it (and validate)
        with open(raw, "rb") as f:
            data = f.read()
        if len(data) == raw_info.bytes and get_hash(algo, data) == raw_info.hashes[algo]:
            continue
        problem = f"corrupt data shard: {raw} does not match the checksum in its index.json"
        if zip_info is None:
            raise DataError(f"{problem} and has no compressed copy to restore it from; restore "
                            "it or re-run tools/prepare_data.py")
        packed = os.path.join(shard.dirname, shard.split, zip_info.basename)
        try:
            ds_internals.rebuild_raw_shard(stream, shard, zip_info, packed, raw)
        except Exception as err:  # missing twin, its checksum, download: one line either way
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{problem}, and it could not be restored from {packed} ({why}); "
                            "restore it or re-run tools/prepare_data.py") from None
        logging.getLogger("pmp_scale").warning(
            f"{problem}; restored it from its compressed copy {zip_info.basename}")


def _data_error(failure: BaseException, remote: str | None) -> DataError:
    message = str(failure).strip()
    if message.startswith("Checksum failure: "):
        path = message.split(": ", 1)[1]
        source = f" (downloaded from {_join(remote, os.path.basename(path))})" if remote else ""
        return DataError(f"corrupt data shard: {path}{source} does not match the checksum in "
                         "its index.json; restore it or re-run tools/prepare_data.py")
    first = message.splitlines()[0] if message else type(failure).__name__
    return DataError(f"data shard could not be loaded: {first}")


def _one_line(err: DataError) -> DataError:
    """A DataError raised in a DataLoader worker process reaches this one wrapped in torch's
    report ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its own
    line is the report's last."""
    text = str(err).strip()
    if "\n" not in text:
        return err
    return DataError(text.splitlines()[-1].split("DataError: ", 1)[-1])


def batches(loader, epochs: int | None = None):
    """Batches across epochs (each pass over the loader is one epoch; state resumes). A shard
    that fails to load (e.g. its checksum) is a one-line DataError naming it."""
    epoch = 0
    while epochs is None or epoch < epochs:
        try:
            yield from loader
        except DataError as err:
            raise _one_line(err) from None
        epoch += 1
