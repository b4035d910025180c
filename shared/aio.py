"""Bridge a blocking iterator (a model streaming tokens in its own thread) into asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make: Iterator[T]) -> AsyncIterator[T]:
    """Items of `make` as they come. When the consumer stops early (a client disconnected), the
    pump stops after the next item and closes `make`, so a generator can abort its work."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for item in make:
                if stop.is_set():
                    break
                put(item)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)
        finally:
            close = getattr(make, "close", None)
            if close is not None:
                close()
            put(_END)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
