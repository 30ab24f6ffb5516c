# SPDX-License-Identifier: Apache-2.0
import pytest

from e2e_llm import storage


def test_local_round_trip_and_listing(tmp_path):
    storage.write_text(str(tmp_path / "a/b.txt"), "hi")
    assert storage.read_text(str(tmp_path / "a/b.txt")) == "hi"
    assert storage.list_dir(str(tmp_path / "a")) == ["b.txt"]
    assert storage.list_dir(str(tmp_path / "missing")) == []
    assert not list(tmp_path.rglob("*.tmp.*"))


def test_unsupported_scheme_is_rejected():
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'ftp'"):
        storage.split_uri("ftp://host/x")


def test_s3_upload_download_against_loopback_server(tmp_path, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="unit")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/w.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(src, "s3://unit/run1")
    assert storage.exists("s3://unit/run1/sub/w.bin")
    assert storage.list_dir("s3://unit/run1") == ["sub"]
    out = storage.download_dir("s3://unit/run1", tmp_path / "dst")
    assert (out / "sub/w.bin").read_bytes() == b"\x00\x01"
    storage.write_text("s3://unit/x.json", "{}")
    assert storage.read_text("s3://unit/x.json") == "{}"
    with pytest.raises(FileNotFoundError, match="s3://unit/nope"):
        storage.read_text("s3://unit/nope")
