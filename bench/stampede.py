"""The stampede client: N connections ask for one cold key at the same instant.

wrk cannot line its connections up on one key at one moment, so this is a small client of its
own, on plain sockets (no event loop between the writes):

    connect N sockets -> pause (the server accepts them all) -> write the same GET on every
    socket in one tight loop (a few ms for 500) -> read every answer -> tally statuses and the
    cache-status header

Blocking; call it in a thread.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.processes import BenchError

SETTLE = 0.2  # seconds between the last connect and the first write


@dataclass
class Burst:
    path: str
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # the cache-status header's values
    write_seconds: float = 0.0  # from the first write to the last
    seconds: float = 0.0  # from the first write to the last answer


@dataclass
class _Answer:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    status: int = 0
    header: str = "-"
    done: bool = False


def burst(host: str, port: int, path: str, connections: int, header: str, within: float) -> Burst:
    """``connections`` simultaneous GETs of ``path``; ``header`` is the one to tally."""
    deadline = time.monotonic() + within
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n\r\n".encode()
    answers = [_Answer(_connect(host, port, deadline)) for _ in range(connections)]
    result = Burst(path)
    try:
        time.sleep(SETTLE)
        started = time.monotonic()
        for answer in answers:
            answer.sock.sendall(request)
        result.write_seconds = time.monotonic() - started
        _read_all(answers, header.lower().encode(), deadline)
        result.seconds = time.monotonic() - started
    finally:
        for answer in answers:
            answer.sock.close()
    for answer in answers:
        result.statuses[answer.status] += 1
        result.cache[answer.header] += 1
    return result


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(answers: list[_Answer], header: bytes, deadline: float) -> None:
    with selectors.DefaultSelector() as selector:
        for answer in answers:
            answer.sock.setblocking(False)
            selector.register(answer.sock, selectors.EVENT_READ, answer)
        pending = len(answers)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{pending} of {len(answers)} stampede answers missing in time")
            for key, _ in selector.select(timeout=left):
                ready: _Answer = key.data
                chunk = ready.sock.recv(65536)
                if chunk:
                    ready.buffer += chunk
                if _complete(ready, header) or not chunk:
                    ready.done = True
                    selector.unregister(ready.sock)
                    pending -= 1


def _complete(answer: _Answer, header: bytes) -> bool:
    """Parse what has arrived; True once a whole response is in."""
    end = answer.buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    lines = bytes(answer.buffer[:end]).split(b"\r\n")
    answer.status = int(lines[0].split()[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == header:
            answer.header = value.decode(errors="replace")
        elif name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    rest = answer.buffer[end + 4 :]
    return rest.endswith(b"0\r\n\r\n") if chunked else len(rest) >= length
