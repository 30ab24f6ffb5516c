# SPDX-License-Identifier: Apache-2.0
"""Storage URIs (local paths, ``file://``, ``s3://``, ``gs://``) through pyarrow filesystems.

Every stage reads and writes artifacts through these helpers, so the same code runs against
a local folder on a laptop, an S3-compatible server on loopback in tests, and a bucket on a
cluster. S3 endpoint and region come from the profile (``storage.endpoint_url``) or the
standard ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` variables, which take precedence.
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUPPORTED = ("file", "s3", "gs")
# Standard variables naming an S3-compatible endpoint, in the order boto3 reads them.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# An object store's request and connection timeouts (S3 through pyarrow, GCS's JSON API in e2e_llm.cas).
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0


class StorageError(RuntimeError):
    pass


def split_uri(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/key') or ('file', '/abs/path')."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme not in SUPPORTED:
            raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}; use a path, file://, s3:// or gs://")
        if scheme == "file":
            return "file", str(Path(rest).resolve())
        return scheme, rest.rstrip("/")
    return "file", str(Path(uri).resolve())


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


def env_s3_endpoint(environ: Any = None) -> tuple[str, str] | None:
    """(variable, endpoint) of the environment's S3 endpoint: ``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``; None where neither is set."""
    environ = os.environ if environ is None else environ
    return next(((name, environ[name]) for name in ENDPOINT_ENV if environ.get(name)), None)


def s3_endpoint(profile_endpoint: str | None = None, environ: Any = None) -> str | None:
    """The S3 endpoint to use: the environment's (:func:`env_s3_endpoint`), else the profile's
    ``storage.endpoint_url``. The environment wins: tests and local servers pick their own port at
    run time. None: the provider's default."""
    from_env = env_s3_endpoint(environ)
    return from_env[1] if from_env else profile_endpoint


def filesystem(uri: str, endpoint_url: str | None = None, region: str | None = None) -> tuple[Any, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    from pyarrow import fs

    scheme, path = split_uri(uri)
    if scheme == "file":
        return fs.LocalFileSystem(), path
    if scheme == "s3":
        endpoint = s3_endpoint(endpoint_url)
        # The AWS SDK gives up on a request after 3 s without a byte; a local store sharing 2 busy
        # cores with an engine can take longer than that to answer, which is slowness, not an outage
        # (an absent store still fails at once: connection refused).
        kwargs: dict[str, Any] = {"region": region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                  "request_timeout": REQUEST_TIMEOUT_S, "connect_timeout": CONNECT_TIMEOUT_S}
        if endpoint:
            scheme_part, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or endpoint, scheme=scheme_part if host else "https")
            kwargs["allow_bucket_creation"] = True
        return fs.S3FileSystem(**kwargs), path
    return fs.GcsFileSystem(), path


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return "/".join([uri.rstrip("/"), *parts])
    return str(Path(uri).joinpath(*parts))


def read_bytes(uri: str, **kw: Any) -> bytes:
    fs, path = filesystem(uri, **kw)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{uri}: not found ({exc})") from None


def read_text(uri: str, **kw: Any) -> str:
    return read_bytes(uri, **kw).decode("utf-8")


def write_bytes(uri: str, data: bytes, **kw: Any) -> None:
    """Write a whole object. Local writes are atomic (temp + rename); S3/GCS puts are atomic."""
    fs, path = filesystem(uri, **kw)
    if split_uri(uri)[0] == "file":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"  # unique per writer thread
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, **kw: Any) -> None:
    write_bytes(uri, text.encode("utf-8"), **kw)


def exists(uri: str, **kw: Any) -> bool:
    from pyarrow.fs import FileType

    fs, path = filesystem(uri, **kw)
    return fs.get_file_info(path).type != FileType.NotFound


def list_dir(uri: str, **kw: Any) -> list[str]:
    """Immediate children (names only) of a directory/prefix; empty when it does not exist."""
    from pyarrow.fs import FileSelector

    fs, path = filesystem(uri, **kw)
    try:
        infos = fs.get_file_info(FileSelector(path, recursive=False, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def tree_version(uri: str, **kw: Any) -> str:
    """A digest of the files under ``uri`` (relative path, size and modification time of each):
    it changes when any file is written again, without reading their content."""
    import hashlib
    import json

    from pyarrow.fs import FileSelector

    fs, path = filesystem(uri, **kw)
    infos = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((posixpath.relpath(i.path, path), i.size, i.mtime_ns) for i in infos if i.is_file)
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def upload_dir(local_dir: str | Path, uri: str, **kw: Any) -> str:
    """Copy a local directory tree to ``uri`` (any supported scheme)."""
    from pyarrow import fs as pafs

    dest_fs, dest = filesystem(uri, **kw)
    if split_uri(uri)[0] == "file":
        Path(dest).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local_dir).resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest_fs)
    return uri


def download_dir(uri: str, local_dir: str | Path, only: Callable[[str], bool] | None = None, **kw: Any) -> Path:
    """Copy the tree at ``uri`` into ``local_dir``; with ``only``, the files whose path relative to
    ``uri`` it accepts."""
    from pyarrow import fs as pafs

    src_fs, src = filesystem(uri, **kw)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    if only is None:
        pafs.copy_files(src, str(local.resolve()), source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local
    for info in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        relative = posixpath.relpath(info.path, src)
        if info.is_file and only(relative):
            (local / relative).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str((local / relative).resolve()), source_filesystem=src_fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return local
