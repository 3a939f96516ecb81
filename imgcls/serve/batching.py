"""Dynamic batching: concurrent requests share one forward pass.

Each request puts its preprocessed image on a queue and awaits a future. One loop takes
whatever is queued (up to ``max_batch``), waits at most ``max_wait_s`` for more when the
batch is not full, runs the batch in a single worker thread and hands each request its
row. While one batch computes, the next one fills up, so under load batches grow by
themselves and at low load a lone request waits at most ``max_wait_s``.

The queue is bounded (``max_queue``) and a request waits at most its ``timeout``: under
overload a request is refused at once (:class:`~imgcls.serve.limits.Overloaded`, answered
503 with Retry-After) instead of joining a queue whose wait grows without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imgcls.serve.limits import Overloaded


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def add(self, n: int) -> None:
        self.requests += n
        self.batches += 1
        self.largest_batch = max(self.largest_batch, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "mean_batch": round(self.requests / self.batches, 2) if self.batches else 0.0}


class DynamicBatcher:
    def __init__(self, infer: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256):
        self.infer = infer  # uint8 (N, C, S, S) -> logits (N, K), called in the worker thread
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imgcls-infer")
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

    def check_room(self) -> None:
        """Overloaded now if the queue is full: lets a request give up before it decodes."""
        if self._queue is not None and self._queue.full():
            raise Overloaded(f"{self.max_queue} requests are already waiting for the model; retry shortly")

    async def submit(self, image: torch.Tensor, timeout: float | None = None) -> np.ndarray:
        """Logits for one uint8 image ``(C, S, S)``; Overloaded when the queue is full or the
        answer takes longer than ``timeout`` seconds."""
        if self._queue is None:
            raise RuntimeError("the batcher was not started (run the app with its lifespan)")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((image, fut))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_queue} requests are already waiting for the model; retry shortly") from None
        try:
            return await asyncio.wait_for(fut, None if timeout is None else max(timeout, 0.001))
        except TimeoutError:  # wait_for cancelled the future: the loop skips it
            raise Overloaded(f"no answer from the model within {timeout:.1f} s; retry shortly") from None

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(items) < self.max_batch:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [(x, f) for x, f in items if not f.done()]  # drop requests whose client went away
            if not items:
                continue
            self.stats.add(len(items))
            try:
                logits = await loop.run_in_executor(self.executor, self.infer, torch.stack([x for x, _ in items]))
            except Exception as exc:  # hand the failure to every waiting request; keep serving
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for row, (_, f) in zip(logits, items):
                if not f.done():
                    f.set_result(row)
