"""H1Transport against a scripted HTTP server on 127.0.0.1: framing, keep-alive, failures.

Each test's server answers request k with `replies[k]` (raw bytes, or a callable doing
something nastier), so what arrives on the wire is exactly what a misbehaving server
would send.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gra_async.client import H1Transport, Timeouts
from gra_async.errors import ConfigError, ConnectionFailed, RequestTimeout

pytestmark = pytest.mark.anyio
Action = Callable[[asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = Timeouts(connect=2.0, read=5.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reply(body: bytes = b'{"ok":true}', status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class Scripted:
    replies: list[bytes | Action]
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    closed_by_client: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                action = self.replies[min(len(self.requests), len(self.replies)) - 1]
                if callable(action):
                    await action(writer)
                else:
                    writer.write(action)
                    await writer.drain()
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@asynccontextmanager
async def serve(*replies: bytes | Action) -> AsyncIterator[tuple[Scripted, str]]:
    script = Scripted(list(replies))
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    script.port = server.sockets[0].getsockname()[1]
    try:
        yield script, f"http://127.0.0.1:{script.port}/v1/chat/completions"
    finally:
        server.close()


async def post(transport: H1Transport, url: str, body: bytes = b"{}",
               timeouts: Timeouts = TIMEOUTS) -> tuple[int, dict[str, str], bytes]:
    response = await transport.request(
        "POST", url, headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
        body=body, timeouts=timeouts, label="m@test")
    return response.status, dict(response.headers), response.body


async def test_one_connection_carries_sequential_calls_and_the_request_is_well_formed() -> None:
    async with serve(reply()) as (server, url):
        transport = H1Transport()
        for i in range(20):
            status, headers, body = await post(transport, url, f'{{"i":{i}}}'.encode())
            assert (status, body, headers["content-type"]) == (200, b'{"ok":true}',
                                                               "application/json")
        await transport.aclose()
        await asyncio.sleep(0.05)
    assert server.connections == 1 and server.closed_by_client == 1
    head, body = server.requests[7]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines and "Content-Length: 7" in lines
    assert "Authorization: Bearer k" in lines and any(x.startswith("User-Agent: gra-async/")
                                                      for x in lines)
    assert body == b'{"i":7}'


async def test_chunked_compressed_and_close_delimited_replies_are_read_whole() -> None:
    big = b"x" * 70_000 + b"end"
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    gzipped = reply(gzip.compress(big), extra="Content-Encoding: gzip\r\n")
    deflated = reply(zlib.compress(b"deflated"), extra="Content-Encoding: deflate\r\n")

    async def close_delimited(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil")
        await writer.drain()
        writer.write(b" the end")
        await writer.drain()
        writer.close()

    async with serve(chunked, gzipped, deflated, close_delimited, reply(b"after")) as (server,
                                                                                      url):
        transport = H1Transport()
        status, headers, body = await post(transport, url)
        assert (status, body, headers["x-a"]) == (200, b"hello world", "1, 2")
        assert (await post(transport, url))[2] == big
        assert (await post(transport, url))[2] == b"deflated"
        assert (await post(transport, url))[2] == b"until the end"
        assert (await post(transport, url))[2] == b"after"  # on a new connection
        await transport.aclose()
    assert server.connections == 2


async def test_an_error_status_is_a_reply_and_an_interim_100_is_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"real")
    async with serve(reply(b'{"error":"no"}', "429 Too Many Requests", "Retry-After: 2\r\n"),
                     interim) as (_, url):
        transport = H1Transport()
        status, headers, body = await post(transport, url)
        assert (status, headers["retry-after"], body) == (429, "2", b'{"error":"no"}')
        assert (await post(transport, url))[:3:2] == (200, b"real")
        await transport.aclose()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def answer_then_close(writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"first"))  # keep-alive promised, then the server hangs up
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with serve(answer_then_close, reply(b"second")) as (server, url):
        transport = H1Transport()
        assert (await post(transport, url))[2] == b"first"
        await asyncio.sleep(0.2)
        assert (await post(transport, url))[2] == b"second"
        await transport.aclose()
    assert server.connections == 2


@pytest.mark.parametrize("wire, reason", [
    (reply(b"0123456789")[:-4], "connection failed"),  # cut mid-body
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nbroken header\r\n\r\nhello", "malformed"),
    (b"NOT HTTP AT ALL\r\n\r\n", "malformed"),
])
async def test_a_cut_or_malformed_reply_is_a_connection_failure(wire: bytes, reason: str) -> None:
    async def send_and_close(writer: asyncio.StreamWriter) -> None:
        writer.write(wire)
        await writer.drain()
        writer.close()

    async with serve(send_and_close, reply(b"fine")) as (_, url):
        transport = H1Transport()
        with pytest.raises(ConnectionFailed, match=reason) as caught:
            await post(transport, url)
        assert str(caught.value).startswith("m@test: ")
        assert (await post(transport, url))[2] == b"fine"
        await transport.aclose()


async def test_a_late_reply_never_reaches_the_next_call() -> None:
    """After a timeout or a cancellation, the connection that would carry the stale reply
    is dropped: the next call gets its own."""

    async def late(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.6)
        writer.write(reply(b"stale"))
        await writer.drain()

    async with serve(late, late, reply(b"fresh")) as (server, url):
        transport = H1Transport()
        with pytest.raises(RequestTimeout, match=r"m@test: no complete reply within 0.3s"):
            await post(transport, url, timeouts=Timeouts(connect=1.0, read=0.3))
        call = asyncio.ensure_future(post(transport, url))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await post(transport, url))[2] == b"fresh"
        await transport.aclose()
    assert server.connections == 3


async def test_many_calls_at_once_get_their_own_replies() -> None:
    async def echo_later(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.01)
        writer.write(reply(b"ok"))
        await writer.drain()

    async with serve(echo_later) as (server, url):
        transport = H1Transport()
        results = await asyncio.gather(*(post(transport, url, b"%d" % i) for i in range(300)))
        assert {r[2] for r in results} == {b"ok"} and len(server.requests) == 300
        assert server.connections == 300  # one per call in flight; caps live above
        for _ in range(3):
            await asyncio.gather(*(post(transport, url) for _ in range(300)))
        assert server.connections == 300  # then reused
        await transport.aclose()


async def test_connect_failures_and_bad_headers_say_what_and_never_show_the_value() -> None:
    transport = H1Transport()
    with pytest.raises(ConnectionFailed, match=r"^m@test: cannot connect \(.*refused"):
        await post(transport, "http://127.0.0.1:9/v1/chat/completions")
    with pytest.raises(ConnectionFailed, match="not an http"):
        await post(transport, "ftp://127.0.0.1/x")
    async with serve(reply()) as (server, url):
        with pytest.raises(ConfigError, match="'Authorization' contains a line break") as bad:
            await transport.request("POST", url, headers={"Authorization": "Bearer sk-1\r\nX: y"},
                                    body=b"{}", timeouts=TIMEOUTS, label="m@test")
        assert "sk-1" not in str(bad.value) and not server.requests
    await transport.aclose()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_verifies_the_server_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    script = Scripted([reply(b"secure")])
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/models"
    try:
        with pytest.raises(ConnectionFailed, match=r"TLS failed .*CERTIFICATE_VERIFY_FAILED"):
            await post(H1Transport(), url)
        trusting = H1Transport(ssl.create_default_context(cafile=str(cert)))
        assert (await post(trusting, url))[2] == b"secure"
        assert (await post(trusting, url))[2] == b"secure"
        await trusting.aclose()
    finally:
        server.close()
    assert script.connections == 1  # the refused handshake never reached the handler


async def test_connections_idle_past_their_time_are_closed_not_kept() -> None:
    async with serve(reply()) as (server, url):
        transport = H1Transport(idle_ttl=0.3)
        await asyncio.gather(*(post(transport, url) for _ in range(50)))
        await asyncio.sleep(0.5)
        await post(transport, url)
        await asyncio.sleep(0.1)
        assert server.connections == 51 and server.closed_by_client == 50
        await transport.aclose()
