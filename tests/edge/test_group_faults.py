"""A stage killed with kill -9 mid-generation: the survivors get a new plan, the first stage replays
every unfinished sequence from its token history, and the tokens equal a run without the fault."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge.group_procs import WAIT_S, StageProc, configure, prompts, tiny_arch
from tests.edge.test_group_exact import engine_tokens

MAX_TOKENS = 48


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[StageProc]]:
    procs = [StageProc(tmp_path, f"s{i}") for i in range(3)]
    yield procs
    for p in procs:
        p.kill()


def wait_tokens(head: StageProc, at_least: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = int(head.stats().get("tokens", 0))
        if got >= at_least:
            return got
        time.sleep(0.05)
    raise AssertionError(f"head never produced {at_least} tokens\n{head.log()}")


@pytest.mark.parametrize("victim", [1, 2])  # a middle stage, the last stage
def test_kill_a_stage_replays_to_identical_tokens(three: list[StageProc], tmp_path: Path,
                                                  victim: int) -> None:
    model = tiny_arch("qwen2", tmp_path / "m")
    batch = prompts(6, seed=7)
    want = engine_tokens(model, batch, MAX_TOKENS)
    configure(three, model, [(0, 1), (1, 3), (3, 4)], epoch=1)
    head = three[0]
    head.generate(batch, MAX_TOKENS)
    wait_tokens(head, 2 * len(batch))  # mid-generation: past the prompts, far from done
    three[victim].kill()  # kill -9
    survivors = [s for i, s in enumerate(three) if i != victim]
    configure(survivors, model, [(0, 2), (2, 4)], epoch=2)  # what the hub's re-plan sends
    got = head.results(len(batch))
    assert [got[str(i)]["tokens"] for i in range(len(batch))] == want
    replays = sum(got[str(i)]["replays"] for i in range(len(batch)))
    assert replays >= 1, "the kill landed after generation ended; nothing was replayed"
    stats = head.stats()
    assert stats["replayed_tokens"] > 0
