"""Admission control for the web service: under overload a request gets a quick 503 with
Retry-After instead of waiting without bound.

* :class:`PixelBudget` bounds the pixels being decoded at once (the memory that uploads
  take), small images passing while a large one waits;
* :class:`Lane` runs one kind of job (Grad-CAM) in its own thread, with a bounded number
  admitted, so it neither piles up nor stalls /predict;
* the batcher's queue (imgcls.serve.batching) is bounded the same way.

Every wait ends at the request's deadline (--timeout); what cannot be admitted raises
:class:`Overloaded`, which the app answers with 503 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any


class Overloaded(Exception):
    """The server cannot take this request now; the client may retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class _PerLoop:
    """asyncio primitives belong to one event loop; an app may be started more than once
    (tests do), so each loop gets its own."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory, self.loop, self.value = factory, None, None

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.value = loop, self.factory()
        return self.value


class PixelBudget:
    """At most ``capacity`` pixels decoded at once. A request that does not fit waits (at
    most ``max_waiting`` requests do) until it fits or its time is up; a request that fits
    goes ahead even while larger ones wait."""

    def __init__(self, capacity: int, max_waiting: int):
        self.capacity, self.max_waiting = capacity, max_waiting
        self.used = self.waiting = 0
        self._cond = _PerLoop(asyncio.Condition)

    @asynccontextmanager
    async def hold(self, pixels: int, timeout: float):
        pixels = max(0, min(pixels, self.capacity))
        cond = self._cond.get()
        async with cond:
            if self.used + pixels > self.capacity:
                if self.waiting >= self.max_waiting:
                    raise Overloaded(f"the server is decoding as many pixels as it may and {self.waiting} "
                                     "uploads are waiting; retry shortly")
                self.waiting += 1
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self.used + pixels <= self.capacity),
                                           max(timeout, 0.001))
                except TimeoutError:
                    raise Overloaded(f"waited {timeout:.1f} s for room to decode the upload; retry shortly") from None
                finally:
                    self.waiting -= 1
            self.used += pixels
        try:
            yield
        finally:
            async with cond:
                self.used -= pixels
                cond.notify_all()


class Lane:
    """Jobs run one at a time in a thread of their own; at most ``max_admitted`` requests hold
    a place (while they prepare, wait or run) at once, and a waiting job that reaches its
    deadline is dropped. Take the place first (:meth:`place`), so a request that would be
    refused is refused before it does any work."""

    def __init__(self, name: str, max_admitted: int):
        self.name, self.max_admitted = name, max_admitted
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"imgcls-{name}")
        self._lock = threading.Lock()
        self.admitted = 0  # a place is held until the thread is done with its job, not until its caller gives up

    def _release(self, _job=None) -> None:
        with self._lock:
            self.admitted -= 1

    @contextmanager
    def place(self):
        with self._lock:
            if self.admitted >= self.max_admitted:
                raise Overloaded(f"{self.admitted} {self.name} requests are already admitted (the most "
                                 f"allowed: {self.max_admitted}); retry shortly")
            self.admitted += 1
        place = _Place(self)
        try:
            yield place
        finally:
            if place.job is None:  # never ran (the request failed first): give the place back now
                self._release()

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        with self.place() as place:
            return await place.run(fn, *args, timeout=timeout)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class _Place:
    def __init__(self, lane: Lane):
        self.lane, self.job = lane, None

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        self.job = self.lane.executor.submit(fn, *args)
        self.job.add_done_callback(self.lane._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.job), max(timeout, 0.001))
        except TimeoutError:
            self.job.cancel()  # a job not yet started never runs; a running one finishes unobserved
            raise Overloaded(f"the {self.lane.name} request waited over {timeout:.1f} s; retry shortly") from None
