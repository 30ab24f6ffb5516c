# SPDX-License-Identifier: Apache-2.0
"""Ports e2e-llm is about to serve on: taken by a listener, or free again after one stopped."""

from __future__ import annotations

import socket

from e2e_llm.ports import free_tcp_port, port_taken


def test_a_listening_port_is_taken_and_free_once_it_closed_even_with_connections_left():
    port = free_tcp_port()
    assert not port_taken("127.0.0.1", port)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    assert port_taken("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    server.close()
    assert not port_taken("127.0.0.1", port)  # a restarted server binds it again (SO_REUSEADDR)


def test_a_ray_address_where_nothing_listens_is_named_at_once():
    """A $RAY_ADDRESS left over from other work: ray.init retried for minutes, printing GCS warnings."""
    from e2e_llm.ports import free_tcp_port
    from e2e_llm.ray_address import unreachable_ray_address

    port = free_tcp_port()
    problem = unreachable_ray_address({"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert problem.startswith(f"$RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster listens there (")
    assert problem.endswith("unset it to run on a Ray instance of this machine, or start that cluster")
    assert unreachable_ray_address({"RAY_ADDRESS": f"ray://127.0.0.1:{port}"}) is not None
    for nothing_to_check in ({}, {"RAY_ADDRESS": ""}, {"RAY_ADDRESS": "auto"}, {"RAY_ADDRESS": "local"}):
        assert unreachable_ray_address(nothing_to_check) is None
    with socket.socket() as cluster:
        cluster.bind(("127.0.0.1", 0))
        cluster.listen()
        assert unreachable_ray_address({"RAY_ADDRESS": f"127.0.0.1:{cluster.getsockname()[1]}"}) is None


def test_a_picked_port_is_outside_the_kernels_ephemeral_range_and_rays_worker_ports():
    """A port picked there was, now and then, taken by another socket before HAProxy bound it."""
    from e2e_llm.ports import RAY_WORKER_PORTS_END, ephemeral_range

    low, high = ephemeral_range()
    for _ in range(50):
        port = free_tcp_port()
        assert port >= RAY_WORKER_PORTS_END and not low <= port <= high
        assert not port_taken("", port)


def test_the_ports_picked_from_follow_the_kernels_range(tmp_path, monkeypatch):
    from e2e_llm import ports

    range_file = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    range_file.write_text("32768\t60999\n")
    assert ports.pickable_ports() == [range(20000, 32768), range(61000, 65536)]
    range_file.write_text("15000 65535\n")  # a host tuned for many connections
    assert ports.pickable_ports() == []
    range_file.unlink()  # no such file (macOS): IANA's range
    assert ports.pickable_ports() == [range(20000, 49152)]


def test_where_no_pickable_port_is_free_any_free_one_is_taken(monkeypatch):
    from e2e_llm import ports

    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        monkeypatch.setattr(ports, "pickable_ports", lambda: [range(taken, taken + 1)])
        port = ports.free_tcp_port()
        assert port != taken and not port_taken("", port)
