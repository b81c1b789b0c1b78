"""Single-flight: at most one lookup of a key and variant runs at a time; the others wait for it.

start(key, variant, run)  -> the running lookup of that key and variant, else a new one
                             (a task of its own: a caller that goes away cancels nothing)
flight.answer(usable)     -> its early answer while usable (a stale entry it refreshes, a hit
                             it refreshes early), else its result
detach(key)               -> its lookups answer whoever waits, and store nothing
epoch                     -> moves on with every detach: a read that started in an older
                             epoch (the hit path's L2 read) must store nothing either
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from functools import partial
from typing import Any

from cache.lookup import Lookup

Run = Callable[["Flight"], Coroutine[Any, Any, Lookup]]


class Flight:
    """One running lookup of a key and variant.

    It may answer before it ends (``early``): with a stale entry while it refreshes it, or with
    a hit it goes on to refresh early. Callers take whichever comes first.
    """

    __slots__ = ("detached", "early", "shared", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Lookup] | None = None
        self.early: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self.detached = False  # detached by a change of its key: answer, but store nothing
        self.shared = True

    def answer_early(self, lookup: Lookup) -> None:
        if not self.early.done():
            self.early.set_result(lookup)

    @property
    def answered(self) -> bool:
        return self.early.done()

    async def answer(self, usable: Callable[[Lookup], bool]) -> Lookup:
        """The early answer while it is ``usable`` (still fresh, or within its stale window),
        else the lookup's; the caller leaving cancels neither."""
        task = self.task
        assert task is not None
        if not self.early.done():
            await asyncio.wait((task, self.early), return_when=asyncio.FIRST_COMPLETED)
        if self.early.done() and usable(self.early.result()):
            return self.early.result()
        if not task.done():
            await asyncio.wait((task,))
        return task.result()


class Flights:
    """The running lookups, by key and variant."""

    __slots__ = ("_running", "epoch")

    def __init__(self) -> None:
        self._running: dict[str, dict[str, Flight]] = {}
        self.epoch = 0

    def __contains__(self, key: str) -> bool:
        """Whether a lookup of ``key`` (any variant) is under way."""
        return key in self._running

    def get(self, key: str, variant: str) -> Flight | None:
        flights = self._running.get(key)
        return flights.get(variant) if flights is not None else None

    def start(self, key: str, variant: str, run: Run, early: Lookup | None = None) -> Flight:
        """The running lookup of ``key``/``variant``, else a new one running ``run(flight)``;
        ``early``: what a new one has already answered (a hit it is to refresh)."""
        flights = self._running.get(key)
        if flights is None:
            flights = self._running[key] = {}
        elif variant in flights:
            return flights[variant]
        flight = Flight()
        flights[variant] = flight
        if early is not None:
            flight.answer_early(early)
        task = asyncio.create_task(run(flight))
        flight.task = task
        task.add_done_callback(partial(self._landed, key, variant, flight))
        return flight

    def detach(self, key: str) -> None:
        """Running lookups of ``key`` answer whoever waits for them, and store nothing."""
        self.epoch += 1
        flights = self._running.pop(key, None)
        if flights is not None:
            for flight in flights.values():
                flight.detached = True

    def detach_prefix(self, prefix: str) -> None:
        """``detach`` every key starting with ``prefix`` ("": every key)."""
        for key in [key for key in self._running if key.startswith(prefix)]:
            self.detach(key)
        self.epoch += 1

    def tasks(self) -> Iterator[asyncio.Task[Lookup]]:
        for flights in self._running.values():
            for flight in flights.values():
                if flight.task is not None:
                    yield flight.task

    def _landed(self, key: str, variant: str, flight: Flight, task: asyncio.Task[Lookup]) -> None:
        flights = self._running.get(key)
        if flights is not None and flights.get(variant) is flight:
            del flights[variant]
            if not flights:
                del self._running[key]
        if not task.cancelled():
            # Retrieved here so an error nobody waited for (every caller left) is not reported
            # as "never retrieved"; the callers that did wait got it through shield().
            task.exception()
