# SPDX-License-Identifier: Apache-2.0
"""The local adapter store (moto on loopback) keeps its objects across restarts, and
`e2e-llm serve` refused at startup leaves no store process behind."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("moto")

from e2e_llm.local_s3 import LocalS3Process as LocalStoreProcess  # noqa: E402
from e2e_llm.local_s3 import endpoint_reachable  # noqa: E402
from e2e_llm.ports import free_tcp_port  # noqa: E402
from e2e_llm.store import AdapterStore  # noqa: E402


def _adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_published_adapters_aliases_and_logs_survive_a_restart_and_deletes_stay_deleted(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    data = tmp_path / "s3"
    server = LocalStoreProcess("127.0.0.1", free_tcp_port(), data).start()
    try:
        store = AdapterStore("s3://local-store-test/adapters", server.endpoint, "us-east-1")
        first = store.publish(_adapter(tmp_path), name="viggo", alias="viggo")
        second = store.publish(_adapter(tmp_path), name="viggo")
        store.set_alias("viggo", stable=first, candidate=second, candidate_weight=0.25)
        from e2e_llm import storage

        storage.write_text("s3://local-store-test/adapters/rollouts-viggo.jsonl", '{"step": 1}\n',
                           endpoint_url=server.endpoint, region="us-east-1")
        storage.write_text("s3://local-store-test/scratch.txt", "gone soon", endpoint_url=server.endpoint,
                           region="us-east-1")
        fs, path = storage.filesystem("s3://local-store-test/scratch.txt", endpoint_url=server.endpoint,
                                      region="us-east-1")
        fs.delete_file(path)
    finally:
        server.stop()  # a clean stop mirrors the last writes
    assert not endpoint_reachable(server.endpoint)

    again = LocalStoreProcess("127.0.0.1", server.port, data).start()
    try:
        store = AdapterStore("s3://local-store-test/adapters", again.endpoint, "us-east-1")
        assert sorted(store.adapter_ids()) == [first, second]
        alias = store.aliases()["viggo"]
        assert (alias.stable, alias.candidate, alias.candidate_weight) == (first, second, 0.25)
        assert store.index()[second]["version"] == "v2"
        from e2e_llm import storage

        kw = {"endpoint_url": again.endpoint, "region": "us-east-1"}
        assert storage.read_text("s3://local-store-test/adapters/rollouts-viggo.jsonl", **kw) == '{"step": 1}\n'
        assert storage.read_bytes(f"s3://local-store-test/adapters/{first}/adapter_model.safetensors",
                                  **kw) == b"\0" * 1000
        assert not storage.exists("s3://local-store-test/scratch.txt", **kw)
    finally:
        again.stop()


def test_a_hangup_of_make_stores_terminal_stops_it_as_ctrl_c_does_its_last_writes_kept(tmp_path, monkeypatch):
    """`make store` in a terminal that closes (an SSH connection dropped): it died at once, and what
    was written since its last mirroring (up to a second) was lost."""
    import signal

    from e2e_llm import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    data = tmp_path / "s3"
    server = LocalStoreProcess("127.0.0.1", free_tcp_port(), data).start()
    kw = {"endpoint_url": server.endpoint, "region": "us-east-1"}
    try:
        fs, _ = storage.filesystem("s3://hangup/last.txt", **kw)
        fs.create_dir("hangup")
        storage.write_text("s3://hangup/last.txt", "written just before", **kw)
        server.proc.send_signal(signal.SIGHUP)
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.terminate()
    again = LocalStoreProcess("127.0.0.1", server.port, data).start()
    try:
        assert storage.read_text("s3://hangup/last.txt", endpoint_url=again.endpoint,
                                 region="us-east-1") == "written just before"
    finally:
        again.stop()


def test_an_empty_data_dir_starts_an_empty_store(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    server = LocalStoreProcess("127.0.0.1", free_tcp_port(), tmp_path / "fresh").start()
    try:
        assert AdapterStore("s3://empty/adapters", server.endpoint, "us-east-1").adapter_ids() == []
    finally:
        server.stop()


def test_a_second_profile_on_the_same_endpoint_is_refused_not_written_into_the_first_ones_store(tmp_path):
    """Two pipelines at once, both profiles naming one local endpoint: the second `e2e-llm serve`
    would publish into the first one's store (and lose it when that stops). It is refused."""
    from e2e_llm.local_s3 import LocalS3Error, running_store, start

    first = LocalStoreProcess("127.0.0.1", free_tcp_port(), tmp_path / "first").start()
    try:
        assert running_store(first.endpoint) == {"data_dir": str((tmp_path / "first").resolve())}
        assert start(first.endpoint, data_dir=tmp_path / "first") is None  # its own store: reused
        with pytest.raises(LocalS3Error, match=rf"the S3 server at {first.endpoint} keeps another store "
                                               rf"\({tmp_path}/first\), not this profile's \({tmp_path}/second\)"):
            start(first.endpoint, data_dir=tmp_path / "second")
        with pytest.raises(LocalS3Error, match="not this profile's \\(in memory\\)"):
            start(first.endpoint)
    finally:
        first.stop()
    assert not (tmp_path / "second").exists()


def test_serve_on_an_endpoint_another_profiles_store_holds_starts_nothing(monkeypatch, tmp_path, capsys):
    from e2e_llm.commands import serve as serve_command
    from e2e_llm.config import load_profile

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    other = LocalStoreProcess("127.0.0.1", free_tcp_port(), tmp_path / "other-profile").start()
    try:
        config = load_profile("local")
        config.storage.endpoint_url = other.endpoint
        config.serve.metrics_export_port = free_tcp_port()  # whatever else runs on this machine
        monkeypatch.setattr("e2e_llm.config.load_profile", lambda *a, **k: config)
        started = []
        monkeypatch.setattr(serve_command, "_serve", lambda *a: started.append(a) or 0)
        args = argparse.Namespace(profile="local", host="127.0.0.1", port=free_tcp_port(), publish="latest",
                                  then=None, ray_temp_dir=None)
        assert serve_command.run(args) == 1
        assert f"error: the S3 server at {other.endpoint} keeps another store" in capsys.readouterr().err
        assert not started
    finally:
        other.stop()


def test_serve_refused_for_a_missing_api_key_starts_no_store(monkeypatch):
    from e2e_llm.commands import serve as serve_command
    from e2e_llm.config import load_profile

    port = free_tcp_port()
    endpoint = f"http://127.0.0.1:{port}"
    config = load_profile("local")
    config.serve.auth.enabled = True
    monkeypatch.setattr("e2e_llm.config.load_profile", lambda *a, **k: config)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv(config.serve.auth.api_key_env, raising=False)
    args = argparse.Namespace(profile="local", host=None, port=None, publish=None, then=None, ray_temp_dir=None)
    assert serve_command.run(args) == 2
    assert not endpoint_reachable(endpoint)


def test_serve_refused_for_a_model_not_prepared_starts_nothing(monkeypatch, tmp_path, capsys):
    """Before any store or Ray starts: the model folder the replicas would load is missing."""
    from e2e_llm.commands import serve as serve_command
    from e2e_llm.config import load_profile

    port = free_tcp_port()
    endpoint = f"http://127.0.0.1:{port}"
    config = load_profile("local")
    config.storage.endpoint_url = endpoint
    monkeypatch.setattr("e2e_llm.config.load_profile", lambda *a, **k: config)
    monkeypatch.setenv("E2E_LLM_CACHE", str(tmp_path / "empty-cache"))
    started = []
    monkeypatch.setattr(serve_command, "_serve", lambda *a: started.append(a) or 0)
    args = argparse.Namespace(profile="local", host=None, port=None, publish=None, then=None, ray_temp_dir=None)
    assert serve_command.run(args) == 1
    assert f"model {config.model.id!r} is not prepared" in capsys.readouterr().err
    assert not started and not endpoint_reachable(endpoint)


def _serve_that_records_a_start(monkeypatch):
    """`e2e-llm serve` on the local profile with its store on a free loopback port, its app start
    replaced by a record: (the command module, the profile, the store endpoint, the starts)."""
    from e2e_llm.commands import serve as serve_command
    from e2e_llm.config import load_profile

    endpoint = f"http://127.0.0.1:{free_tcp_port()}"
    config = load_profile("local")
    config.storage.endpoint_url = endpoint
    monkeypatch.setattr("e2e_llm.config.load_profile", lambda *a, **k: config)
    started = []
    monkeypatch.setattr(serve_command, "_serve", lambda *a: started.append(a) or 0)
    return serve_command, config, endpoint, started


def test_serve_refused_for_a_port_in_use_starts_nothing(monkeypatch, capsys):
    import socket

    serve_command, config, endpoint, started = _serve_that_records_a_start(monkeypatch)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        args = argparse.Namespace(profile="local", host="127.0.0.1", port=port, publish=None, then=None,
                                  ray_temp_dir=None)
        assert serve_command.run(args) == 1
    assert f"127.0.0.1:{port} is in use by another program" in capsys.readouterr().err
    assert not started and not endpoint_reachable(endpoint)


def test_serve_beside_another_on_the_metrics_port_starts_nothing(monkeypatch, capsys):
    """A second `e2e-llm serve` (another profile) on this machine: Ray's metrics agent could not bind
    serve.metrics_export_port, and Ray said "the node timed out during startup" a minute later."""
    import socket

    serve_command, config, endpoint, started = _serve_that_records_a_start(monkeypatch)
    with socket.socket() as first_app_metrics:
        first_app_metrics.bind(("", 0))
        first_app_metrics.listen()
        config.serve.metrics_export_port = first_app_metrics.getsockname()[1]
        args = argparse.Namespace(profile="local", host="127.0.0.1", port=free_tcp_port(), publish=None, then=None,
                                  ray_temp_dir=None)
        assert serve_command.run(args) == 1
    err = capsys.readouterr().err
    assert f"error: port {config.serve.metrics_export_port} (serve.metrics_export_port" in err
    assert "e.g. another `e2e-llm serve`: give this profile another one in" in err
    assert not started and not endpoint_reachable(endpoint)


def test_the_store_in_the_foreground_logs_clients_requests_not_its_own_mirroring(tmp_path):
    """`make store` prints each request; the mirror's own (two a second) would bury them."""
    import subprocess
    import sys
    import time

    from e2e_llm.local_s3 import READY, SYNC_S, _client

    port = free_tcp_port()
    proc = subprocess.Popen([sys.executable, "-m", "e2e_llm.local_s3", "-p", str(port), "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(READY)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="logged")
        client.put_object(Bucket="logged", Key="k", Body=b"v")
        deadline = time.monotonic() + 60
        while not (tmp_path / "logged" / "k").exists():  # mirrored: the mirror has made requests
            assert time.monotonic() < deadline, "the mirror never wrote the object"
            time.sleep(SYNC_S / 4)
        assert _client(f"http://127.0.0.1:{port}").list_buckets()["Buckets"]  # a mirror-agent request
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    requests = [line for line in err.splitlines() if "HTTP/1.1" in line]
    assert any('"PUT /logged HTTP/1.1" 200' in line for line in requests)
    assert any('"PUT /logged/k HTTP/1.1" 200' in line for line in requests)
    assert not any('"GET / HTTP/1.1"' in line for line in requests), requests  # list_buckets: the mirror's
