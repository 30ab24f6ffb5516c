# SPDX-License-Identifier: Apache-2.0
"""The local S3 server launcher (e2e_llm.local_s3): writes one at a time, reads concurrent,
clear errors for a stopped or non-loopback server."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e_llm.local_s3 import LocalS3Error, require_reachable, serialized_writes, start


class SlowApp:
    """A WSGI app that records how many requests of each method run at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = {"PUT": 0, "GET": 0}
        self.peak = {"PUT": 0, "GET": 0}

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        with self.lock:
            self.running[method] += 1
            self.peak[method] = max(self.peak[method], self.running[method])
        time.sleep(0.05)
        with self.lock:
            self.running[method] -= 1
        start_response("200 OK", [])
        return [b"ok"]


def test_mutating_requests_run_one_at_a_time_and_reads_do_not_wait():
    app = SlowApp()
    wrapped = serialized_writes(app)
    barrier = threading.Barrier(8)

    def call(method):
        barrier.wait()
        return wrapped({"REQUEST_METHOD": method}, lambda *a: None)

    with ThreadPoolExecutor(8) as pool:
        assert all(r == [b"ok"] for r in pool.map(call, ["PUT", "GET"] * 4))
    assert app.peak["PUT"] == 1
    assert app.peak["GET"] > 1


def test_a_stopped_loopback_server_is_named_with_what_to_do():
    with pytest.raises(LocalS3Error, match=r"no S3 server at http://127.0.0.1:1 for the store s3://b/a: .*make store"):
        require_reachable("http://127.0.0.1:1", "the store s3://b/a")
    require_reachable("https://s3.example.com", "a remote store")  # not ours to check
    require_reachable(None, "a local folder")


def test_a_store_too_busy_to_answer_at_once_is_still_there():
    """A running store on a loaded machine (the full test suite on 2 cores) may take seconds to
    answer a request: it is there, and is neither reported missing nor started a second time."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # listens, never accepts or answers
        endpoint = f"http://127.0.0.1:{busy.getsockname()[1]}"
        require_reachable(endpoint, "the store s3://b/a")
        assert start(endpoint) is None


def test_only_a_loopback_endpoint_is_started():
    with pytest.raises(LocalS3Error, match="only a loopback endpoint"):
        start("http://10.1.2.3:9000")


def test_make_store_serves_the_profiles_store_where_e2e_llm_serve_keeps_it(project_root, monkeypatch, tmp_path,
                                                                          capsys):
    """`make store PROFILE=...` and `e2e-llm serve` run one store: the profile's endpoint and
    <storage root>/s3, so adapters published through one are there for the other."""
    from e2e_llm.cli import main
    from e2e_llm.config import load_profile
    from e2e_llm.store import local_store_address, local_store_dir

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "E2E_LLM_STORAGE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(project_root / "configs")  # any folder of the project
    assert local_store_address(load_profile("local")) == ("127.0.0.1", 9321, project_root / ".e2e/local/s3")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9555")  # the environment wins, as for serve
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path))
    config = load_profile("local")
    assert local_store_address(config) == ("127.0.0.1", 9555, tmp_path / "s3") == \
        ("127.0.0.1", 9555, local_store_dir(config))

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert main(["store", "--profile", "cluster"]) == 1
    assert "cluster.yaml: the adapter store's S3 endpoint (the provider) is not on loopback" in capsys.readouterr().err
