import asyncio
import threading
from collections.abc import Iterator

import pytest

from pice.shared.aio import iterate_in_thread


def test_items_and_errors_cross_into_asyncio() -> None:
    def gen() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("model failed")

    async def consume() -> list[int]:
        return [x async for x in iterate_in_thread(gen())]

    with pytest.raises(RuntimeError, match="model failed"):
        asyncio.run(consume())


def test_an_early_exit_closes_the_source() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    async def first() -> int:
        async for x in iterate_in_thread(endless()):
            return x
        raise AssertionError("no item")

    assert asyncio.run(first()) == 1
    assert closed.wait(timeout=300)  # a hang guard, not a deadline: it closes at once
