# SPDX-License-Identifier: Apache-2.0
"""Compare-and-swap writes of small objects (JSON records, logs) at a storage URI.

Object stores cannot lock or append, so every shared record (the adapter store's index and
aliases, a rollout log) is updated the same way: read it with its version token, compute the new
content, write it only if the object still has that token. A write that loses the race writes
nothing; :func:`update` re-reads and retries a bounded number of times, then gives up with a
clear error. Nothing is ever overwritten unseen.

- ``s3://``: conditional PUT (``If-None-Match: *`` creates, ``If-Match: <ETag>`` replaces),
  through boto3 (pyarrow's filesystem cannot send preconditions).
- ``gs://``: the JSON API's generation preconditions (``ifGenerationMatch``, 0 = must not
  exist), through google-auth's authorized session (``STORAGE_EMULATOR_HOST`` for an emulator),
  retried as GCS asks (429: a second write to one object within a second; 5xx; lost connections).
- local paths: create = hard link of a complete temp file (fails when the name exists);
  replace = under an exclusive ``flock`` on a hidden lock file beside the object (released by
  the kernel if the holder dies), compare the content's sha256, then an atomic rename.

Tokens compare content versions: an ETag, a generation, a sha256. Two writes of identical bytes
may share a token; that is harmless here, since every new content is computed from what was read.
For the same reason a write retried after its answer was lost, then refused because the object
moved on, counts as written when the object holds its bytes: the first try landed (else another
writer made, from the same record, the same change: a rollout record is unique, an index or alias
change is the same publish or alias set).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from e2e_llm.storage import StorageError, split_uri

ATTEMPTS = 50  # re-read + retry rounds before update() gives up
LOCK_TIMEOUT_S = 30.0  # a local lock is held for one read + rename; waiting longer means something is wrong


class PreconditionFailed(StorageError):
    """The object changed (or, for a create, exists) since it was read: nothing was written."""


class TooManyConflicts(StorageError):
    """:func:`update` lost the race every time."""


@dataclass(frozen=True)
class Versioned:
    data: bytes | None  # None: the object does not exist
    token: str | None  # what a conditional write compares; None when absent


def read(uri: str, **kw: Any) -> Versioned:
    """The object's bytes and version token (``Versioned(None, None)`` when absent)."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return _local_read(Path(path))
    bucket, key = _bucket_key(uri, path)
    return _s3_read(bucket, key, kw) if scheme == "s3" else _gcs_read(bucket, key)


def write(uri: str, data: bytes, expect: str | None, **kw: Any) -> str:
    """Write ``data`` only if the object's token is still ``expect`` (None: only if it does not
    exist). Returns the new token; raises :class:`PreconditionFailed` without writing otherwise."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return _local_write(Path(path), data, expect)
    bucket, key = _bucket_key(uri, path)
    return _s3_write(bucket, key, data, expect, kw) if scheme == "s3" else _gcs_write(bucket, key, data, expect)


def create(uri: str, data: bytes, **kw: Any) -> bool:
    """Create the object if absent (True), or leave the existing one alone (False)."""
    try:
        write(uri, data, None, **kw)
    except PreconditionFailed:
        return False
    return True


def update(uri: str, change: Callable[[bytes | None], bytes], *, attempts: int = ATTEMPTS,
           **kw: Any) -> Versioned:
    """Read-modify-write with compare-and-swap. ``change`` gets the current bytes (None when
    absent) and returns the new ones; it runs again on every retry, so it must be pure (it may
    raise to abort). Returns what was written."""
    for attempt in range(attempts):
        current = read(uri, **kw)
        data = change(current.data)
        try:
            return Versioned(data, write(uri, data, current.token, **kw))
        except PreconditionFailed:
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** min(attempt, 6))))  # jittered backoff
    raise TooManyConflicts(f"{uri}: changed by other writers {attempts} times in a row while updating it; "
                           "nothing was written (retry later)")


def _bucket_key(uri: str, path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise StorageError(f"{uri}: needs a bucket and an object key")
    return bucket, key


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- local paths ---------------------------------------------------------------------------------


def _local_read(path: Path) -> Versioned:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Versioned(None, None)
    return Versioned(data, _digest(data))


@contextmanager
def locked(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on the hidden ``.<name>.lock`` beside ``path``, across processes;
    released when the block ends or the process dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(f"{path}: its lock .{path.name}.lock is held for over "
                                       f"{timeout_s:g}s by another process") from None
                time.sleep(random.uniform(0.002, 0.02) if timeout_s <= LOCK_TIMEOUT_S else 0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_write(path: Path, data: bytes, expect: str | None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if expect is None:
            try:
                os.link(tmp, path)  # atomic create-if-absent with the complete content
                return _digest(data)
            except FileExistsError:
                raise PreconditionFailed(f"{path}: already exists") from None
            except OSError:  # a filesystem without hard links: fall back to the lock
                pass
        with locked(path):
            current = _local_read(path)
            if current.token != expect:
                raise PreconditionFailed(f"{path}: " + ("already exists" if expect is None else
                                                        "changed since it was read"))
            os.replace(tmp, path)
        return _digest(data)
    finally:
        tmp.unlink(missing_ok=True)


# -- S3 --------------------------------------------------------------------------------------------

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_S3_ABSENT = ("NoSuchKey", "404", "NotFound", "NoSuchBucket")
_S3_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _s3(kw: dict[str, Any]):
    """A boto3 client per process and endpoint (clients are thread-safe; sessions are not).
    With no ``endpoint_url`` boto3 reads ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` itself."""
    endpoint, region = kw.get("endpoint_url"), kw.get("region")
    key = (os.getpid(), endpoint, region, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    with _clients_lock:
        if key not in _clients:
            try:
                import boto3
            except ImportError:
                raise StorageError("s3:// conditional writes need boto3 (it is in the serve environment)") from None
            # region None: boto3's own chain (AWS_REGION, AWS_DEFAULT_REGION, config; S3 redirects)
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)
        return _clients[key]


def _s3_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _s3_read(bucket: str, key: str, kw: dict[str, Any]) -> Versioned:
    from botocore.exceptions import ClientError

    try:
        response = _s3(kw).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _s3_code(exc) in _S3_ABSENT:
            return Versioned(None, None)
        raise StorageError(f"s3://{bucket}/{key}: {exc}") from None
    return Versioned(response["Body"].read(), response["ETag"])


def _s3_write(bucket: str, key: str, data: bytes, expect: str | None, kw: dict[str, Any]) -> str:
    from botocore.exceptions import ClientError

    condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
    try:
        return _s3(kw).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except ClientError as exc:
        code = _s3_code(exc)
        # If-Match on an object that is gone answers NoSuchKey: it changed since it was read.
        if code in _S3_CONFLICT or (expect is not None and code in ("NoSuchKey", "404")):
            if exc.response.get("ResponseMetadata", {}).get("RetryAttempts"):  # boto3 retried: an earlier
                current = _s3_read(bucket, key, kw)  # try may have written it, and then it is this write's
                if current.data == data:
                    return str(current.token)
            raise PreconditionFailed(f"s3://{bucket}/{key}: " + ("already exists" if expect is None else
                                                                 "changed since it was read")) from None
        raise StorageError(f"s3://{bucket}/{key}: {exc}") from None


# -- GCS -------------------------------------------------------------------------------------------

# What GCS asks clients to retry, with truncated exponential backoff: 408, 429 (among others, a
# second write to one object within a second: GCS's per-object limit, which an index updated by
# several publishers, or a rollout log appended to twice in a second, reaches) and 5xx, and
# connections that failed or timed out. Conditional requests are safe to retry.
GCS_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
GCS_BACKOFF_FIRST_S = 1.0
GCS_BACKOFF_MAX_S = 32.0
GCS_RETRY_DEADLINE_S = 120.0
_gcs_lock = threading.Lock()
_gcs: dict[int, tuple[Any, str]] = {}


def gcs_session() -> tuple[Any, str]:
    """(an HTTP session with ``get``/``post``, the API base URL), one per process."""
    with _gcs_lock:
        if os.getpid() not in _gcs:
            emulator = os.environ.get("STORAGE_EMULATOR_HOST")
            if emulator:
                import requests

                base = emulator if "://" in emulator else f"http://{emulator}"  # host:port alone, as often given
                _gcs[os.getpid()] = (requests.Session(), base.rstrip("/"))
            else:
                import google.auth
                from google.auth.transport.requests import AuthorizedSession

                credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
                _gcs[os.getpid()] = (AuthorizedSession(credentials), "https://storage.googleapis.com")
        return _gcs[os.getpid()]


@dataclass
class _GcsResponse:
    status_code: int
    content: bytes
    text: str
    headers: Any
    body: Callable[[], Any]
    ambiguous: bool  # an earlier try may have been applied (a 5xx, or a connection lost or timed out)


def _gcs_request(method: str, url: str, what: str, **kw: Any) -> _GcsResponse:
    """One JSON API request, retried as GCS asks (:data:`GCS_RETRY_STATUS`, connection errors,
    timeouts) until :data:`GCS_RETRY_DEADLINE_S`; then :class:`StorageError` naming ``what``."""
    from requests.exceptions import ConnectionError as ConnectionFailed
    from requests.exceptions import Timeout

    from e2e_llm.storage import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S

    session, base = gcs_session()
    deadline = time.monotonic() + GCS_RETRY_DEADLINE_S
    delay, tries, ambiguous = GCS_BACKOFF_FIRST_S, 0, False
    while True:
        tries += 1
        try:
            response = getattr(session, method)(f"{base}{url}", timeout=(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S),
                                                **kw)
        except (ConnectionFailed, Timeout) as exc:
            last, ambiguous = f"{type(exc).__name__}: {exc}", True
        else:
            if response.status_code not in GCS_RETRY_STATUS:
                return _GcsResponse(response.status_code, response.content, response.text, response.headers,
                                   response.json, ambiguous)
            last = f"HTTP {response.status_code} {response.text[:200]}"
            ambiguous = ambiguous or response.status_code >= 500
        pause = random.uniform(delay / 2, delay)
        if time.monotonic() + pause > deadline:
            raise StorageError(f"{what}: {last} (tried {tries} times in {GCS_RETRY_DEADLINE_S:g} s)")
        time.sleep(pause)
        delay = min(delay * 2, GCS_BACKOFF_MAX_S)


def _gcs_read(bucket: str, key: str) -> Versioned:
    what = f"gs://{bucket}/{key}"
    response = _gcs_request("get", f"/storage/v1/b/{bucket}/o/{quote(key, safe='')}", what, params={"alt": "media"})
    if response.status_code == 404:
        return Versioned(None, None)
    if response.status_code != 200:
        raise StorageError(f"{what}: HTTP {response.status_code} {response.text[:200]}")
    if "x-goog-generation" not in response.headers:  # GCS sends it; some emulators do not
        raise StorageError(f"{what}: the server sent no x-goog-generation header, which compare-and-swap writes "
                           "need (an emulator without object generations?)")
    return Versioned(response.content, response.headers["x-goog-generation"])


def _gcs_write(bucket: str, key: str, data: bytes, expect: str | None) -> str:
    what = f"gs://{bucket}/{key}"
    response = _gcs_request("post", f"/upload/storage/v1/b/{bucket}/o", what, data=data,
                            params={"uploadType": "media", "name": key, "ifGenerationMatch": expect or "0"},
                            headers={"Content-Type": "application/octet-stream"})
    if response.status_code == 412:
        if response.ambiguous:  # an earlier try may have written it: then it is this write's
            current = _gcs_read(bucket, key)
            if current.data == data:
                return str(current.token)
        raise PreconditionFailed(f"{what}: " + ("already exists" if expect is None else "changed since it was read"))
    if response.status_code != 200:
        raise StorageError(f"{what}: HTTP {response.status_code} {response.text[:200]}")
    return str(response.body()["generation"])
