# SPDX-License-Identifier: Apache-2.0
"""Compare-and-swap writes (e2e_llm.cas): create-if-absent, replace-if-unchanged and the
retrying update, on local paths, on the S3 server (moto on loopback) and on GCS's JSON API
(a fake session with generation preconditions: no GCS server runs here)."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e_llm import cas


@pytest.fixture(params=["local", "s3"])
def uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "records" / "obj.json")
    request.getfixturevalue("s3_server")
    import boto3

    bucket = f"cas-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/records/obj.json"


def test_create_only_if_absent_and_replace_only_if_unchanged(uri):
    assert cas.read(uri) == cas.Versioned(None, None)
    first = cas.write(uri, b"one", None)
    with pytest.raises(cas.PreconditionFailed, match="already exists"):
        cas.write(uri, b"other", None)
    assert cas.read(uri) == cas.Versioned(b"one", first)
    second = cas.write(uri, b"two", first)
    with pytest.raises(cas.PreconditionFailed, match="changed since it was read"):
        cas.write(uri, b"lost", first)  # a writer that read "one" must not overwrite "two"
    assert cas.read(uri) == cas.Versioned(b"two", second)
    assert cas.create(uri, b"x") is False and cas.read(uri).data == b"two"


def test_replace_of_a_missing_object_is_refused(uri):
    with pytest.raises(cas.PreconditionFailed):
        cas.write(uri, b"x", "some-old-token")
    assert cas.read(uri).data is None


def test_concurrent_updates_lose_nothing(uri):
    """12 threads x 5 increments of one counter object: every increment lands exactly once."""
    cas.write(uri, b"0", None)
    barrier = threading.Barrier(12)

    def work(_):
        barrier.wait()
        for _ in range(5):
            cas.update(uri, lambda data: str(int(data) + 1).encode())

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(work, range(12)))
    assert cas.read(uri).data == b"60"


def test_update_gives_up_after_bounded_conflicts(tmp_path, monkeypatch):
    path = str(tmp_path / "obj")
    cas.write(path, b"0", None)

    def meddle(data):  # another writer gets in every time
        cas.write(path, data + b"!", cas.read(path).token)
        return data + b"x"

    with pytest.raises(cas.TooManyConflicts, match="changed by other writers 3 times in a row.*nothing was written"):
        cas.update(path, meddle, attempts=3)
    assert cas.read(path).data == b"0!!!"


def test_local_create_leaves_no_temp_files(tmp_path):
    cas.write(str(tmp_path / "a.json"), b"{}", None)
    with pytest.raises(cas.PreconditionFailed):
        cas.write(str(tmp_path / "a.json"), b"{}", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# -- GCS -----------------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, status_code, content=b"", headers=None, body=None):
        self.status_code, self.content, self.headers, self._body = status_code, content, headers or {}, body
        self.text = content.decode(errors="replace") if content else ""

    def json(self):
        return self._body


class FakeGCS:
    """GCS JSON API media download and upload with ``ifGenerationMatch`` (0 = must not exist)."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 1000
        self.lock = threading.Lock()

    def get(self, url, params=None):
        assert params == {"alt": "media"}
        name = url.split("/storage/v1/b/", 1)[1]
        with self.lock:
            if name not in self.objects:
                return FakeResponse(404)
            data, generation = self.objects[name]
        return FakeResponse(200, data, {"x-goog-generation": str(generation)})

    def post(self, url, data=None, params=None, headers=None):
        bucket = url.split("/b/", 1)[1].split("/", 1)[0]
        from urllib.parse import quote

        name = f"{bucket}/o/{quote(params['name'], safe='')}"
        with self.lock:
            current = self.objects.get(name, (None, 0))[1]
            if int(params["ifGenerationMatch"]) != current:
                return FakeResponse(412, b"conditionNotMet")
            self.generation += 1
            self.objects[name] = (data, self.generation)
            return FakeResponse(200, body={"generation": str(self.generation)})


@pytest.fixture
def gcs(monkeypatch):
    fake = FakeGCS()
    monkeypatch.setattr(cas, "gcs_session", lambda: (fake, "https://gcs.test"))
    return fake


def test_gcs_uses_generation_preconditions(gcs):
    uri = "gs://bucket/adapters/index.json"
    assert cas.read(uri).data is None
    first = cas.write(uri, b"one", None)
    with pytest.raises(cas.PreconditionFailed, match="already exists"):
        cas.write(uri, b"two", None)
    second = cas.write(uri, b"two", first)
    with pytest.raises(cas.PreconditionFailed, match="changed since it was read"):
        cas.write(uri, b"lost", first)
    assert cas.read(uri) == cas.Versioned(b"two", second)
    assert list(gcs.objects) == ["bucket/o/adapters%2Findex.json"]


def test_gcs_rollout_log_second_writer_fails_without_writing(gcs):
    from e2e_llm.canary import ConcurrentRolloutError, RolloutLog

    first, second = RolloutLog("gs://bucket/rollouts-viggo.jsonl"), RolloutLog("gs://bucket/rollouts-viggo.jsonl")
    assert first.read() == [] and second.read() == []
    first.append({"event": "start", "by": "first"})
    with pytest.raises(ConcurrentRolloutError, match="changed under this controller"):
        second.append({"event": "start", "by": "second"})
    assert [r["by"] for r in RolloutLog("gs://bucket/rollouts-viggo.jsonl").read()] == ["first"]
