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
