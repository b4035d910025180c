"""Bridge a blocking iterator (a model streaming tokens in its own thread) into asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make: Iterator[T]) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def pump() -> None:
        try:
            for item in make:
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as exc:  # re-raised in the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        item = await queue.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item  # type: ignore[misc]
