"""s3:// data against a real S3 protocol endpoint: moto in server mode on 127.0.0.1, started
and stopped here, with credentials enforced (IAM user and key created before enforcement).

Training from s3:// with node-local caches, a lost node and a mid-epoch resume, bit-exact
against local data, is part of the multi-node test (tests/test_multinode.py). Here: the three
ways a remote dataset is wrong each give one clear line.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import pmp_scale.data.loader as loader_mod
from helpers import free_port
from pmp_scale.data import DataError, batches, build_loader, read_meta

BUCKET = "pmp-data"


def upload(client, local: Path, bucket: str, prefix: str, corrupt: bool = False) -> None:
    """A prepared dataset as object storage holds it: meta.json, index.json, compressed shards
    (no decompressed `.mds` copies from earlier local reads)."""
    for path in sorted(Path(local).rglob("*")):
        if not path.is_file() or path.suffix == ".mds":
            continue
        body = path.read_bytes()
        if corrupt and path.name.endswith(".zstd") and path.parent.name == "train":
            body = bytearray(body)
            body[len(body) // 2] ^= 0xFF
            body = bytes(body)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local)}", Body=body)


@pytest.fixture(scope="module")
def s3(tiny_data):
    import boto3
    import requests
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
             "aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
    try:
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", '
            '"Resource": "*"}]}'))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket=BUCKET)
        upload(s3, Path(tiny_data["data"]), BUCKET, "tiny")
        upload(s3, Path(tiny_data["data"]), BUCKET, "corrupt", corrupt=True)
        # from here on every request must be signed with a key the server knows
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()
        yield {"endpoint": endpoint, "key_id": key["AccessKeyId"],
               "secret": key["SecretAccessKey"]}
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=30)
        server.stop()


@pytest.fixture
def remote_env(s3, monkeypatch):
    """One local streaming process, talking to the moto endpoint with the trainer's key."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(loader_mod, "_stale_shm_cleaned", True)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    return monkeypatch


def _one_line(call) -> str:
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_reads_with_the_right_key_and_streams_into_a_local_cache(remote_env, tmp_path):
    assert read_meta(f"s3://{BUCKET}/tiny")["seq_len"] == 64
    loader = build_loader(f"s3://{BUCKET}/tiny", "val", 2, shuffle=False, seed=0,
                          local_cache=str(tmp_path / "cache"))
    assert sum(1 for _ in batches(loader, epochs=1)) > 0
    assert list((tmp_path / "cache" / "val").glob("shard.*.mds"))


def test_missing_bucket_is_one_clear_line(remote_env):
    assert _one_line(lambda: read_meta("s3://no-such-bucket/tiny")) == (
        "cannot read s3://no-such-bucket/tiny/meta.json: bucket 'no-such-bucket' does not exist")


def test_missing_dataset_in_an_existing_bucket_is_one_clear_line(remote_env):
    assert _one_line(lambda: read_meta(f"s3://{BUCKET}/elsewhere")).startswith(
        f"cannot read s3://{BUCKET}/elsewhere/meta.json: no such object in bucket '{BUCKET}'")


def test_wrong_credentials_are_one_clear_line(remote_env):
    remote_env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert _one_line(lambda: read_meta(f"s3://{BUCKET}/tiny")).startswith(
        f"cannot read s3://{BUCKET}/tiny/meta.json: access refused (HTTP 403): check the "
        "credentials")


def test_corrupt_remote_shard_is_one_clear_line(remote_env, tmp_path):
    cache = tmp_path / "cache"
    loader = build_loader(f"s3://{BUCKET}/corrupt", "train", 2, shuffle=False, seed=0,
                          local_cache=str(cache))
    message = _one_line(lambda: [None for _ in batches(loader, epochs=1)])
    assert message.startswith(
        f"corrupt data shard: {cache}/train/shard.00000.mds.zstd (downloaded from "
        f"s3://{BUCKET}/corrupt/train/shard.00000.mds.zstd) does not match the checksum in its "
        "index.json"), message
