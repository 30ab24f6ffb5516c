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
