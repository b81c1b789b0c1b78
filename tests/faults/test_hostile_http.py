"""Malformed and hostile HTTP, sent as raw bytes to the proxy port.

What a user relies on: a bad request gets a 4xx or a closed connection, never a 5xx; the
process survives it; and it leaves nothing behind in the cache (a normal GET of the same
resource afterwards is the origin's answer). A few requests are odd but legitimate (an HTTP/0.9
line, dot-segments above the root): the resource's own answer is right for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Proxy, Spawn, start_origin, start_proxy
from tests.faults.conftest import Figures
from tests.faults.harness import Load, ms, p50, p99, proxy_config, server_errors, unanswered

pytestmark = pytest.mark.e2e

ANSWER_WITHIN = 3.0  # seconds a complete request may take to be answered or closed
IDLE_TIMEOUT = 2.0  # server.idle_timeout: a request head not finished by then is cut off


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    request: bytes  # "{path}" stands for the case's own resource
    served_ok: bool = False  # legitimate: the resource's own 200 is a right answer too


def head(line: str, *headers: str) -> bytes:
    """A request head: ``line``, Host, ``headers``, Connection: close."""
    return "\r\n".join([line, "Host: cachecar", *headers, "Connection: close", "", ""]).encode()


CASES = [
    Case("bad request line", b"GARBAGE\r\n\r\n"),
    Case("invalid method token (G@T)", head("G@T {path} HTTP/1.1")),
    Case("unknown method (FOO)", head("FOO {path} HTTP/1.1")),
    Case("HTTP version 9.9", head("GET {path} HTTP/9.9")),
    Case("HTTP/0.9-style line (no version)", b"GET {path}\r\n\r\n", served_ok=True),
    Case(
        "Content-Length and Transfer-Encoding",
        head("POST {path} HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked")
        + b"0\r\n\r\n",
    ),
    Case(
        "two Content-Lengths",
        head("POST {path} HTTP/1.1", "Content-Length: 5", "Content-Length: 6") + b"hello!",
    ),
    Case("Content-Length: -1", head("POST {path} HTTP/1.1", "Content-Length: -1")),
    Case("Content-Length: 0x5", head("POST {path} HTTP/1.1", "Content-Length: 0x5") + b"hello"),
    Case(
        "Transfer-Encoding: xchunked", head("POST {path} HTTP/1.1", "Transfer-Encoding: xchunked")
    ),
    Case(
        "Transfer-Encoding: chunked, identity",
        head("POST {path} HTTP/1.1", "Transfer-Encoding: chunked, identity") + b"0\r\n\r\n",
    ),
    Case(
        "invalid chunk size",
        head("PUT {path} HTTP/1.1", "Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n",
    ),
    Case(
        "Transfer-Encoding on HTTP/1.0",
        head("POST {path} HTTP/1.0", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    ),
    Case(
        "Content-Length of 1 TB, 2 bytes sent",
        head("PUT {path} HTTP/1.1", "Content-Length: 1000000000000") + b"ab",
    ),
    Case(
        "Expect: 100-continue for 99 GB",
        head("PUT {path} HTTP/1.1", "Expect: 100-continue", "Content-Length: 99999999999"),
    ),
    Case("one header of 100 KB", head("GET {path} HTTP/1.1", "X-Big: " + "a" * 100_000)),
    Case(
        "1000 headers",
        head("GET {path} HTTP/1.1", *(f"X-Header-{n}: value" for n in range(1000))),
    ),
    Case("request target of 100 KB", head("GET {path}/" + "a" * 100_000 + " HTTP/1.1")),
    Case("header line without a colon", head("GET {path} HTTP/1.1", "X-No-Colon")),
    Case("space before the colon", head("GET {path} HTTP/1.1", "X-Space : 1")),
    Case("obs-fold (folded header)", head("GET {path} HTTP/1.1", "X-Folded: a", " b")),
    Case("control character in a header", head("GET {path} HTTP/1.1", "X-Ctl: a\x01b")),
    Case("bare LF line endings", b"GET {path} HTTP/1.1\nHost: cachecar\nConnection: close\n\n"),
    Case("invalid percent-encoding (%zz)", head("GET {path}%zz HTTP/1.1")),
    Case("truncated percent-encoding (%)", head("GET {path}% HTTP/1.1")),
    Case("encoded NUL (%00)", head("GET {path}%00 HTTP/1.1")),
    Case("raw NUL in the path", head("GET {path}\x00 HTTP/1.1")),
    Case("dot-segments above the root", head("GET /../..{path} HTTP/1.1"), served_ok=True),
    Case("absolute-form target", head("GET http://127.0.0.1{path} HTTP/1.1")),
    Case("asterisk-form (OPTIONS *)", head("OPTIONS * HTTP/1.1")),
    Case("asterisk-form (GET *)", head("GET * HTTP/1.1")),
    Case("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    Case("TLS ClientHello", bytes.fromhex("16030100a5010000a10303") + bytes(100)),
    Case("random binary", bytes(range(256)) * 4),
]


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int | None  # None: the connection closed with no answer
    interim: tuple[int, ...]  # 1xx answers before it
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        if self.status is None:
            return "connection closed, no answer"
        said = _said(self.body)
        shown = f"{self.status} from {self.answered_by()}" + (f" ({said})" if said else "")
        return " then ".join([*(str(n) for n in self.interim), shown])

    def answered_by(self) -> str:
        """aiohttp (its parser or router), cachecar's handler, or the origin through it."""
        if "x-cache" not in self.headers:
            return "aiohttp"
        try:
            found = json.loads(self.body)
        except ValueError:
            found = None
        own = isinstance(found, dict) and set(found) == {"error", "detail"}
        return "cachecar" if own else "the origin, via cachecar"


def _said(body: bytes) -> str:
    """The gist of an error body: a JSON ``error``, else the first line of the text."""
    try:
        found = json.loads(body)
    except ValueError:
        found = None
    if isinstance(found, dict):
        return str(found.get("error", ""))
    lines = [line.strip() for line in body.decode("utf-8", "replace").splitlines()]
    first = next((line for line in lines if line), "")
    for echo in (": b'", ": bytearray("):  # aiohttp echoes the offending bytes: not shown
        first = first.partition(echo)[0]
    first = first.removesuffix(":")
    return first if len(first) > 2 else ""


async def exchange(port: int, data: bytes, within: float = ANSWER_WITHIN) -> Answer:
    """Send ``data`` on a fresh connection; the answer (past any 1xx), or a closed connection.
    Fails when neither comes within ``within`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        # The server may cut a huge request short; what it answered is still readable.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(within):
            interim: list[int] = []
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return Answer(None, tuple(interim), {}, b"")
                status_line, *lines = raw.decode("latin-1").split("\r\n")
                status = int(status_line.split()[1])
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines if line)
                }
                if 100 <= status < 200:
                    interim.append(status)
                    continue
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                else:
                    body = await reader.read()
                return Answer(status, tuple(interim), headers, body)
    finally:
        writer.close()


async def serve_normally(
    session: aiohttp.ClientSession, proxy: Proxy, path: str, expected: bytes
) -> str:
    """GET ``path`` the normal way; it must be the origin's value. Returns its X-Cache."""
    async with session.get(proxy.url + path) as answer:
        body = await answer.read()
        assert (answer.status, body) == (200, expected), (path, answer.status, body)
        return answer.headers.get("X-Cache", "")


async def hostile_setup(spawn: Spawn, tmp_path: Path) -> tuple[Proxy, dict[str, bytes]]:
    """cachecar in front of the demo origin, which holds one resource per case (/users/h{n})."""
    origin = await start_origin(spawn)
    values = {}
    for n in range(len(CASES)):
        values[f"/users/h{n}"] = json.dumps({"case": n}).encode()
        await origin.put(f"/users/h{n}", {"case": n})
    config = proxy_config(
        tmp_path / "c.yaml",
        f"""\
        upstream: {{url: "{origin.url}", timeout: 2s}}
        l2: {{url: "memory://"}}
        routes:
          - path: /users/{{id}}
            key: "users:{{id}}"
        """,
        server=f"idle_timeout: {IDLE_TIMEOUT:g}s",
    )
    return await start_proxy(spawn, config), values


async def test_malformed_requests_get_a_4xx_or_a_close_and_leave_the_cache_clean(
    spawn: Spawn, tmp_path: Path, figures: Figures
) -> None:
    proxy, values = await hostile_setup(spawn, tmp_path)
    port = int(proxy.url.rsplit(":", 1)[1])
    outcomes: list[tuple[str, str, str]] = []
    wrong: list[str] = []
    async with aiohttp.ClientSession() as session:
        for n, case in enumerate(CASES):
            path = f"/users/h{n}"
            answer = await exchange(port, case.request.replace(b"{path}", path.encode()))
            fine = answer.status is None or 400 <= answer.status < 500
            if case.served_ok and answer.status == 200:
                fine = answer.body == values[path]  # the resource's own answer
            if not fine:
                wrong.append(f"{case.name}: {answer.describe()} {answer.body[:200]!r}")
            assert proxy.process.popen.poll() is None, f"cachecar died on {case.name!r}"
            # Nothing the hostile request did is served to a normal one.
            after = await serve_normally(session, proxy, path, values[path])
            outcomes.append((case.name, answer.describe(), after))
        async with session.get(proxy.admin + "/healthz") as health:
            assert health.status == 200
        async with session.get(proxy.admin + "/metrics") as scraped:
            metrics = await scraped.text()
    assert wrong == [], "\n".join(wrong)
    fives = [
        line
        for line in metrics.splitlines()
        if line.startswith("cachecar_requests_total{") and 'status="5' in line
    ]
    assert fives == [], fives
    # A flood of bad requests must not be a flood of ERROR tracebacks in the log.
    logged = proxy.process.output().count("Error handling request")
    assert logged == 0

    table = figures("Malformed and hostile HTTP", columns=("case", "answer"))
    for name, described, after in outcomes:
        table.add(name, f"{described}; then a normal GET: 200 {after}")
    table.add(
        "after all of them",
        f"/healthz 200; no 5xx in cachecar_requests_total; {logged} ERROR tracebacks in the "
        f"log for {len(CASES)} requests (each refusal is one DEBUG line)",
    )


async def test_slowloris_connections_do_not_keep_others_from_being_served(
    spawn: Spawn, tmp_path: Path, figures: Figures
) -> None:
    proxy, values = await hostile_setup(spawn, tmp_path)
    port = int(proxy.url.rsplit(":", 1)[1])
    trickling, hold_for, every = 100, 4.0, 0.5
    closed_by_server: list[float] = []

    async def slowloris() -> None:
        """A request head sent one header line every ``every`` seconds, never finished."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            writer.write(b"GET /users/h0 HTTP/1.1\r\nHost: cachecar\r\n")
            for n in range(int(hold_for / every)):
                await asyncio.sleep(every)
                if reader.at_eof():
                    closed_by_server.append(time.monotonic() - started)
                    return
                writer.write(f"X-Slow-{n}: {n}\r\n".encode())
                await writer.drain()
        except ConnectionError:
            closed_by_server.append(time.monotonic() - started)
        finally:
            writer.close()

    paths = list(values)
    async with aiohttp.ClientSession() as session:
        async with Load(session, lambda n: proxy.url + paths[n % len(paths)]) as before:
            await asyncio.sleep(1.0)
        lorises = [asyncio.create_task(slowloris()) for _ in range(trickling)]
        await asyncio.sleep(0.2)  # every slow connection open and trickling
        async with Load(session, lambda n: proxy.url + paths[n % len(paths)]) as during:
            await asyncio.sleep(hold_for - 1.0)
        await asyncio.gather(*lorises)
        for path, value in values.items():
            await serve_normally(session, proxy, path, value)
        assert proxy.process.popen.poll() is None

    for load in (before, during):
        assert server_errors(load.samples) == []
        assert unanswered(load.samples) == []
        assert {s.status for s in load.samples} == {200}
    assert len(during.samples) > 50, "others were barely served during the slowloris"
    # Each head that never ends is cut off once server.idle_timeout has passed.
    assert len(closed_by_server) == trickling
    assert min(closed_by_server) >= IDLE_TIMEOUT - 0.1
    assert max(closed_by_server) <= IDLE_TIMEOUT + every + 0.5

    table = figures("Slowloris")
    table.add(
        "slow connections",
        f"{trickling}, each sending one header line every {every:g} s for {hold_for:g} s",
    )
    table.add(
        f"closed by cachecar (server.idle_timeout: {IDLE_TIMEOUT:g} s): how many, first / last",
        f"{len(closed_by_server)}, after {min(closed_by_server):.2f} s / "
        f"{max(closed_by_server):.2f} s",
    )
    table.add("normal GETs before: requests, p50 / p99", _load(before))
    table.add("normal GETs during: requests, p50 / p99", _load(during))
    table.add("5xx or unanswered among them", 0)


def _load(load: Load) -> str:
    return f"{len(load.samples)}, {ms(p50(load.samples))} / {ms(p99(load.samples))}"
