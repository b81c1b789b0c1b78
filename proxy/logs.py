"""What cachecar logs besides its diagnostics: the access log, aiohttp's malformed-request noise
made quiet, and URLs with their passwords redacted."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from queue import Full, Queue

from aiohttp.http_exceptions import HttpProcessingError

logger = logging.getLogger("cachecar")


class _MalformedRequest(logging.Filter):
    """aiohttp logs each request its parser refuses (already answered 400) as an ERROR with a
    traceback: any client could flood the log. Such a record becomes one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= exc.code < 500:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "refused a malformed request (%d): %s", (exc.code, exc.message)
        record.exc_info = record.exc_text = None
        return True


def quiet_malformed_requests() -> None:
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, _MalformedRequest) for existing in server.filters):
        server.addFilter(_MalformedRequest())


class AccessLog(logging.Handler):
    """The access log: JSON lines alone on stdout, apart from the diagnostics on stderr.

    A thread of its own writes them to a copy of stdout's descriptor, so a stdout nobody reads
    (a stalled log shipper, a full pipe) never blocks the event loop, nor the exit: past
    ``MAX_BACKLOG`` waiting lines, new ones are dropped and counted.
    """

    MAX_BACKLOG = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self._lines: Queue[bytes | None] = Queue(self.MAX_BACKLOG)
        self._fd = os.dup(sys.stdout.fileno())
        self._writer = threading.Thread(target=self._write, name="access-log", daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put_nowait(record.getMessage().encode() + b"\n")
        except Full:
            self.dropped += 1

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:  # stdout closed: nothing more can be written
                self.dropped += 1

    def __enter__(self) -> None:
        access = logging.getLogger("cachecar.access")
        access.addHandler(self)
        access.setLevel(logging.INFO)
        access.propagate = False
        self._writer.start()

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("cachecar.access").removeHandler(self)
        with contextlib.suppress(Full):
            self._lines.put_nowait(None)
        self._writer.join(timeout=1.0)  # what is still waiting, if stdout takes it
        stuck = self._writer.is_alive()
        if not stuck:
            os.close(self._fd)
        if self.dropped or stuck:
            logger.warning(
                "access log: %d lines dropped%s (stdout was not read fast enough)",
                self.dropped,
                f", {self._lines.qsize()} left unwritten" if stuck else "",
            )


def redact(url: str) -> str:
    """``url`` without its password, for logs (cluster and Sentinel URLs list several hosts)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{hosts}{slash}{path}"
