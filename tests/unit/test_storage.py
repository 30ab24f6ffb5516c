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


def test_s3_endpoint_the_environment_wins_over_the_profile_s3_variable_first():
    both = {"AWS_ENDPOINT_URL_S3": "http://s3-only:1", "AWS_ENDPOINT_URL": "http://any:2"}
    assert storage.s3_endpoint("http://profile:3", both) == "http://s3-only:1"
    assert storage.s3_endpoint("http://profile:3", {"AWS_ENDPOINT_URL": "http://any:2"}) == "http://any:2"
    assert storage.s3_endpoint("http://profile:3", {"AWS_ENDPOINT_URL_S3": ""}) == "http://profile:3"
    assert storage.s3_endpoint(None, {}) is None


def test_every_s3_client_uses_the_same_endpoint_rule(monkeypatch, local_config):
    """The storage filesystem, the adapter store, the serving replicas and the batch engines."""
    from e2e_llm.batch import engine_env
    from e2e_llm.serve import _with_runtime_endpoint, app_args
    from e2e_llm.store import AdapterStore

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:4567")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    fs, _ = storage.filesystem("s3://bucket/key", endpoint_url="http://profile:1")
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:4567"
    assert AdapterStore("s3://bucket/adapters", "http://profile:1")._kw["endpoint_url"] == "http://127.0.0.1:4567"
    args = _with_runtime_endpoint(app_args(local_config))
    assert args["adapter_store"]["endpoint_url"] == "http://127.0.0.1:4567"
    assert args["llm_configs"][0]["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:4567"
    assert engine_env(local_config, "s3://bucket/merged")["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:4567"
