# SPDX-License-Identifier: Apache-2.0
"""Compare-and-swap writes (e2e_llm.cas): create-if-absent, replace-if-unchanged and the
retrying update, on local paths, on the S3 server (moto on loopback) and on GCS's JSON API
(a fake session with generation preconditions: no GCS server runs here)."""

from __future__ import annotations

import threading
import time
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
    """GCS JSON API media download and upload with ``ifGenerationMatch`` (0 = must not exist), and
    what GCS documents of its failures: a second write to one object within ``write_interval_s``
    is refused with 429 (GCS: once a second); ``lose_next_responses`` writes are applied, then
    answered 503 (a response lost after the write); ``down`` answers every request 503."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 1000
        self.lock = threading.Lock()
        self.write_interval_s = 0.0
        self.last_write: dict[str, float] = {}
        self.lose_next_responses = 0
        self.down = False
        self.statuses: list[int] = []  # every write's answer
        self.timeouts: list[object] = []  # every request's timeout

    def get(self, url, params=None, timeout=None):
        self.timeouts.append(timeout)
        assert params == {"alt": "media"}
        if self.down:
            return FakeResponse(503, b"backendError")
        name = url.split("/storage/v1/b/", 1)[1]
        with self.lock:
            if name not in self.objects:
                return FakeResponse(404)
            data, generation = self.objects[name]
        return FakeResponse(200, data, {"x-goog-generation": str(generation)})

    def post(self, url, data=None, params=None, headers=None, timeout=None):
        self.timeouts.append(timeout)
        with self.lock:
            response = self._post(url, data, params)
            self.statuses.append(response.status_code)
            return response

    def _post(self, url, data, params):
        if self.down:
            return FakeResponse(503, b"backendError")
        bucket = url.split("/b/", 1)[1].split("/", 1)[0]
        from urllib.parse import quote

        name = f"{bucket}/o/{quote(params['name'], safe='')}"
        now = time.monotonic()
        if now - self.last_write.get(name, -1e9) < self.write_interval_s:
            return FakeResponse(429, b"rateLimitExceeded")
        current = self.objects.get(name, (None, 0))[1]
        if int(params["ifGenerationMatch"]) != current:
            return FakeResponse(412, b"conditionNotMet")
        self.generation += 1
        self.objects[name] = (data, self.generation)
        self.last_write[name] = now
        if self.lose_next_responses:
            self.lose_next_responses -= 1
            return FakeResponse(503, b"backendError")
        return FakeResponse(200, body={"generation": str(self.generation)})


@pytest.fixture
def gcs(monkeypatch):
    fake = FakeGCS()
    monkeypatch.setattr(cas, "gcs_session", lambda: (fake, "https://gcs.test"))
    monkeypatch.setattr(cas, "GCS_BACKOFF_FIRST_S", 0.02)  # GCS's pace, 50x faster
    monkeypatch.setattr(cas, "GCS_BACKOFF_MAX_S", 0.64)
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


def test_gcs_writes_to_one_object_faster_than_it_allows_are_retried_and_none_is_lost(gcs):
    """GCS refuses a second write to one object within a second (429): 4 publishers updating the
    same index land every update once, waiting as GCS asks, and no update fails."""
    gcs.write_interval_s = 0.05
    uri = "gs://bucket/adapters/index.json"
    cas.write(uri, b"0", None)

    def work(_):
        for _ in range(3):
            cas.update(uri, lambda data: str(int(data) + 1).encode())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert cas.read(uri).data == b"12"
    assert 429 in gcs.statuses  # the limit was reached, and waited out
    assert gcs.timeouts and None not in gcs.timeouts  # no request may hang for ever


def test_a_gcs_write_whose_answer_was_lost_is_applied_once(gcs):
    """The write was applied and its answer lost (503): the retry is refused (412, the object
    moved on), and the write is known as this one's; the counter moves by one, not two."""
    uri = "gs://bucket/counter.json"
    cas.write(uri, b"0", None)
    gcs.lose_next_responses = 1
    written = cas.update(uri, lambda data: str(int(data) + 1).encode())
    assert written.data == b"1" and cas.read(uri) == cas.Versioned(b"1", written.token)
    assert gcs.statuses[-2:] == [503, 412]
    gcs.lose_next_responses = 1
    assert cas.create("gs://bucket/other.json", b"first")  # the answer lost: still this create's
    with pytest.raises(cas.PreconditionFailed, match="already exists"):
        cas.write("gs://bucket/other.json", b"second", None)  # another writer's create: refused
    assert cas.read("gs://bucket/other.json").data == b"first"


def test_gcs_down_past_the_deadline_is_an_error_naming_the_object(gcs, monkeypatch):
    monkeypatch.setattr(cas, "GCS_RETRY_DEADLINE_S", 0.3)
    gcs.down = True
    with pytest.raises(cas.StorageError,
                       match=r"gs://bucket/index.json: HTTP 503 backendError \(tried \d+ times in 0.3 s\)"):
        cas.read("gs://bucket/index.json")
    gcs.down = False
    assert cas.read("gs://bucket/index.json").data is None


@pytest.mark.parametrize("setting", ["127.0.0.1:9023", "http://127.0.0.1:9023/"])
def test_a_gcs_emulator_named_with_or_without_its_scheme_is_reached_over_http(setting, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", setting)
    monkeypatch.setattr(cas, "_gcs", {})
    assert cas.gcs_session()[1] == "http://127.0.0.1:9023"


def test_an_s3_write_retried_after_its_answer_was_lost_is_applied_once(s3_server):
    """boto3 retries a PUT whose answer did not come (a timeout, a 5xx): the first try was applied,
    so the retry is refused (412). That write is known as this one's: the counter moves by one."""
    import boto3

    bucket = f"cas-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/counter.json"
    cas.write(uri, b"0", None)
    events = cas._s3({}).meta.events
    lost = []

    def lose_the_first_answer(response, attempts, **_):
        if attempts == 1 and response is not None and response[0].status_code == 200:
            lost.append(response[0].status_code)
            return 0  # retry at once, as for an answer that never came
        return None

    events.register_first("needs-retry.s3.PutObject", lose_the_first_answer)
    try:
        written = cas.update(uri, lambda data: str(int(data) + 1).encode())
    finally:
        events.unregister("needs-retry.s3.PutObject", lose_the_first_answer)
    assert lost and written.data == b"1" and cas.read(uri) == cas.Versioned(b"1", written.token)


def test_a_gcs_server_without_generations_is_named_not_a_key_error(gcs, monkeypatch):
    """gcp-storage-emulator answers media downloads without x-goog-generation."""
    cas.write("gs://bucket/index.json", b"{}", None)
    real_get = gcs.get

    def without_generation(url, params=None, timeout=None):
        response = real_get(url, params=params, timeout=timeout)
        response.headers.pop("x-goog-generation", None)
        return response

    monkeypatch.setattr(gcs, "get", without_generation)
    with pytest.raises(cas.StorageError, match="gs://bucket/index.json: the server sent no x-goog-generation header"):
        cas.read("gs://bucket/index.json")
