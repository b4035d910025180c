"""The edge hub on a live server, driven by a hand-driven agent: a real WebSocket client that
expands points with a real tiny model but misbehaves on purpose (duplicate and stale results,
protocol violations) or records how much work it is given at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pice.edge.expander import EdgeWorker
from pice.shared.config import ServeSettings
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import (
    AgentBatchDone,
    AgentRegister,
    AgentResult,
    HubTasks,
    HubWelcome,
    decode_hub_message,
)
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.edge.agent_procs import edges, make_tokens, wait_for


class Hub:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tokens = make_tokens(tmp / "tokens.json", "dup", "slow", "rude")
        settings = ServeSettings(port=_free_port(), cloud_model=str(model_dir),
                                 edge_models=[str(model_dir)], local_edges=False,
                                 edge_tokens_file=tmp / "tokens.json", edge_heartbeat_s=0.5,
                                 edge_lease_s=30.0, max_context=1024, default_max_tokens=64,
                                 guard=False,  # keep the edges' sections (no cloud repair)
                                 cache_dir=tmp / "cache")
        self.server = LiveServer(settings)
        self.ws_url = self.server.url.replace("http://", "ws://") + "/v1/edges/connect"
        self.model = str(model_dir)  # the spec the server's tasks name
        self.worker = EdgeWorker("scripted", HFGenerator(self.model, max_context=1024))

    def connect(self, edge_id: str, token: str | None = None) -> Any:
        return websockets.connect(self.ws_url, additional_headers={
            "Authorization": f"Bearer {self.tokens[edge_id] if token is None else token}"},
            max_size=None)

    def stream_sections(self) -> list[dict[str, Any]]:
        """POST /v1/progressive as SSE; every section event, duplicates included."""
        sections = []
        with httpx.stream("POST", f"{self.server.url}/v1/progressive", timeout=120, json={
                "question": SKETCH_QUESTIONS[0], "mode": "progressive", "max_tokens": 60}) as r:
            event = ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "section":
                    sections.append(json.loads(line.split(":", 1)[1]))
        return sections


@pytest.fixture(scope="module")
def hub(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub"), sketch_model_dir)
    h.server.start()
    yield h
    h.server.stop()


def run_agent(hub: Hub, edge_id: str, slots: int, requests: int,
              on_batch: Any) -> dict[str, int]:
    """Register, answer batches with `on_batch`, leave after `requests` answered requests."""
    stats = {"batches": 0, "outstanding": 0, "max_outstanding": 0}

    async def main() -> None:
        async with hub.connect(edge_id) as ws:
            await ws.send(AgentRegister(edge_id=edge_id, models=[hub.model],
                                        slots=slots).model_dump_json())
            assert isinstance(decode_hub_message(await ws.recv()), HubWelcome)
            asker = asyncio.get_running_loop().run_in_executor(
                None, lambda: [hub.stream_sections() for _ in range(requests)])
            handlers = []
            while not asker.done():
                done, _ = await asyncio.wait({asker, asyncio.create_task(ws.recv())},
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is asker:
                        continue
                    msg = decode_hub_message(t.result())
                    if isinstance(msg, HubTasks):
                        stats["batches"] += 1
                        stats["outstanding"] += len(msg.tasks)
                        stats["max_outstanding"] = max(stats["max_outstanding"],
                                                       stats["outstanding"])
                        handlers.append(asyncio.create_task(on_batch(ws, msg, stats)))
            stats["sections"] = asker.result()  # type: ignore[assignment]

    asyncio.run(main())
    return stats


def test_duplicate_and_stale_results_are_dropped(hub: Hub) -> None:
    async def twice(ws: Any, msg: HubTasks, stats: dict[str, int]) -> None:
        for r in hub.worker.expand(msg.tasks):
            for batch_id in (msg.batch_id, msg.batch_id, "stale-batch"):
                await ws.send(AgentResult(batch_id=batch_id, result=r).model_dump_json())
        stats["outstanding"] -= len(msg.tasks)
        await ws.send(AgentBatchDone(batch_id=msg.batch_id).model_dump_json())

    stats = run_agent(hub, "dup", slots=8, requests=1, on_batch=twice)
    [sections] = stats["sections"]  # type: ignore[misc]
    assert sorted(s["index"] for s in sections) == [0, 1, 2]  # each point exactly once
    assert {s["worker"] for s in sections} == {"dup"}


def test_an_edge_never_gets_more_points_than_its_slots(hub: Hub) -> None:
    async def slowly(ws: Any, msg: HubTasks, stats: dict[str, int]) -> None:
        await asyncio.sleep(0.2)  # hold the slot while the hub has more points waiting
        for r in hub.worker.expand(msg.tasks):
            stats["outstanding"] -= 1
            await ws.send(AgentResult(batch_id=msg.batch_id, result=r).model_dump_json())
        await ws.send(AgentBatchDone(batch_id=msg.batch_id).model_dump_json())

    stats = run_agent(hub, "slow", slots=1, requests=2, on_batch=slowly)
    assert stats["max_outstanding"] == 1
    assert stats["batches"] == 6  # 2 requests x 3 points, one at a time
    for sections in stats["sections"]:  # type: ignore[attr-defined]
        assert sorted(s["index"] for s in sections) == [0, 1, 2]


@pytest.mark.parametrize("frames, reason", [
    (["not json"], "expected a register frame"),
    ([AgentRegister(edge_id="someone-else", models=["m"], slots=1).model_dump_json()],
     "does not match its token's edge 'rude'"),
    ([AgentRegister(edge_id="rude", models=["m"], slots=1).model_dump_json(),
      '{"type": "result", "batch_id": "b"}'], "bad agent frame: result.result"),
    ([AgentRegister(edge_id="rude", models=["m"], slots=1).model_dump_json(),
      "x" * (4 * 1024 * 1024 + 1)], "over the 4194304-byte cap"),
    ([AgentRegister(edge_id="rude", models=["m"], slots=1).model_dump_json(),
      AgentRegister(edge_id="rude", models=["m"], slots=1).model_dump_json()],
     "unexpected AgentRegister frame"),
])
def test_protocol_violations_close_the_connection(hub: Hub, frames: list[str],
                                                  reason: str) -> None:
    async def main() -> str:
        async with hub.connect("rude") as ws:
            for frame in frames:
                await ws.send(frame)
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                assert exc.rcvd.code == 1008
                return exc.rcvd.reason
        raise AssertionError("not closed")

    assert reason in asyncio.run(main())
    wait_for("the registry to drop it", lambda: "rude" not in edges(hub.server.url))


def test_unknown_token_is_refused_at_connect(hub: Hub) -> None:
    async def main(token: str) -> int:
        with pytest.raises(InvalidStatus) as exc:
            async with hub.connect("x", token=token):
                pass
        return exc.value.response.status_code

    assert asyncio.run(main("pice-edge.abc.def")) == 401
    assert asyncio.run(main("")) == 401


def test_edges_endpoint_and_agents_off_by_default(server: LiveServer) -> None:
    body = httpx.get(f"{server.url}/v1/edges").json()
    assert body["remote_enabled"] is False
    assert [(e["edge_id"], e["kind"], e["healthy"]) for e in body["data"]] == \
        [("edge-0", "local", True)]

    async def main() -> int:
        url = server.url.replace("http://", "ws://") + "/v1/edges/connect"
        with pytest.raises(InvalidStatus) as exc:
            async with websockets.connect(url):
                pass
        return exc.value.response.status_code

    assert asyncio.run(main()) == 403
