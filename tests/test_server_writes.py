"""``OneWriteTransport``: a response's head goes out with its first body chunk, in one write."""

from __future__ import annotations

import asyncio
import socket

from mnemo.service.server import OneWriteTransport
from tests.service_helpers import make_settings, running_server

pytest_plugins = ["tests.service_fixtures"]


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_head_and_body_go_out_together_and_in_order():
    async def run() -> Recorder:
        recorder = Recorder()
        transport = OneWriteTransport(recorder, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert recorder.writes == []  # held for the body
        transport.write(b"{}")
        transport.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")  # a head without a body ...
        await asyncio.sleep(0)  # ... goes out on the loop's next turn
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.close()  # closing flushes what is held
        assert transport.get_extra_info("peername") == "info:peername"  # the rest is the transport's
        return recorder

    recorder = asyncio.run(run())
    assert recorder.writes == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 304 Not Modified\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ]
    assert recorder.closed


def test_writes_after_the_connection_closed_are_dropped():
    """uvloop raises on them (a client gone with pipelined answers in flight); nobody could read them."""

    async def run() -> Recorder:
        recorder = Recorder()
        transport = OneWriteTransport(recorder, asyncio.get_running_loop())
        recorder.close()  # the client left
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        await asyncio.sleep(0)
        return recorder

    assert asyncio.run(run()).writes == []


def test_a_real_server_answers_in_one_segment(bundle_dir):
    """Over a socket: the whole small answer arrives in one recv (head and body together)."""
    with running_server(make_settings(bundle_dir)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"status":"ok"}')
