# SPDX-License-Identifier: Apache-2.0
"""Tar archives unpack on every supported Python: with tarfile's ``data`` filter where it exists
(3.11.4+), and with the same refusals where it does not (Debian 12's 3.11.2, where passing the
filter raised TypeError and a KubeRay rollback failed)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from e2e_llm.archives import UnsafeArchive, extract_all


def _archive(path, members: dict[str, bytes | None], link: str | None = None):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755  # as git archive writes folders
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("k8s/escape")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
    return path


@pytest.fixture(params=["filter", "no filter"])
def python(request, monkeypatch):
    """This Python's filter (where it has one), and a Python without tarfile's filters (before 3.11.4)."""
    if request.param == "filter" and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filters: the other case is its own")
    if request.param == "no filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        real = tarfile.TarFile.extractall

        def old_extractall(self, path=".", members=None, *, numeric_owner=False, **kwargs):
            if "filter" in kwargs:
                raise TypeError("TarFile.extractall() got an unexpected keyword argument 'filter'")
            return real(self, path, members, numeric_owner=numeric_owner)

        monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    return request.param


def test_plain_files_and_folders_unpack(python, tmp_path):
    path = _archive(tmp_path / "a.tar", {"k8s": None, "k8s/overlays/prod/kustomization.yaml": b"resources: []\n"})
    with tarfile.open(path) as tar:
        extract_all(tar, tmp_path / "out")
    assert (tmp_path / "out" / "k8s/overlays/prod/kustomization.yaml").read_bytes() == b"resources: []\n"


@pytest.mark.parametrize("members,link", [({"../outside.yaml": b"x"}, None), ({"k8s": None}, "/etc/passwd")])
def test_members_that_would_land_outside_are_refused(python, tmp_path, members, link):
    path = _archive(tmp_path / "a.tar", members, link)
    with tarfile.open(path) as tar, pytest.raises((UnsafeArchive, getattr(tarfile, "FilterError", UnsafeArchive))):
        extract_all(tar, tmp_path / "out")
    assert not (tmp_path / "outside.yaml").exists()


def test_an_absolute_member_never_lands_at_its_absolute_path(python, tmp_path):
    """The data filter unpacks it under the destination; without the filter it is refused."""
    name = f"/{tmp_path.name}-absolute.yaml"
    path = _archive(tmp_path / "a.tar", {name: b"x"})
    try:
        with tarfile.open(path) as tar:
            extract_all(tar, tmp_path / "out")
    except UnsafeArchive:
        assert python == "no filter"
    else:
        assert (tmp_path / "out" / name.lstrip("/")).read_bytes() == b"x"
    assert not Path(name).exists()
