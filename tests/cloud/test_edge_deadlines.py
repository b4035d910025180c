"""An edge that is alive (heartbeats, pongs) but never returns results must not stall requests:
its batch misses a deadline derived from its token budget and measured rate, the points move to
another edge or the cloud, the hub cancels the batch on the edge, and the edge counts as suspect
so placement avoids it. Real server on loopback, real agent protocol over a real WebSocket; the
deadline floor is short only because the stalled edge never answers (nothing races it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice.cloud.edge_base import DeadlineConfig, EdgeStats
from pice.edge.expander import EdgeWorker
from pice.shared.config import ServeSettings
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionTask
from pice.shared.worker import CLOUD_WORKER_ID
from tests.cloud.scripted_edge import ScriptedEdge
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.edge.agent_procs import edges, make_tokens, wait_for

FAST = 1e6  # tokens/s a stalled edge claims, so placement prefers it


class Setup:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tokens = make_tokens(tmp / "tokens.json", "mute-a", "mute-b", "good")
        settings = ServeSettings(port=_free_port(), cloud_model=str(model_dir),
                                 edge_models=[str(model_dir)], local_edges=False,
                                 edge_tokens_file=tmp / "tokens.json", edge_heartbeat_s=0.5,
                                 edge_lease_s=30.0, max_context=1024, default_max_tokens=64,
                                 guard=False, cache_dir=tmp / "cache",
                                 edge_deadline_floor_s=2.0, edge_suspect_s=3600.0)
        self.server = LiveServer(settings)
        self.ws_url = self.server.url.replace("http://", "ws://") + "/v1/edges/connect"
        self.model = str(model_dir)

    def edge(self, edge_id: str, worker: EdgeWorker | None = None,
             tokens_per_s: float = FAST) -> ScriptedEdge:
        return ScriptedEdge(self.ws_url, self.tokens[edge_id], edge_id, self.model, worker,
                            tokens_per_s)

    def ask(self, sections: bool = True) -> dict[str, Any]:
        r = httpx.post(f"{self.server.url}/v1/progressive", timeout=180, json={
            "question": SKETCH_QUESTIONS[0], "mode": "progressive", "max_tokens": 60,
            "stream": False})
        assert r.status_code == 200, r.text
        body = dict(r.json())
        if sections:
            assert body["mode"] == "progressive" and body["sections"], body
        return body


@pytest.fixture(scope="module")
def setup(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("deadlines"), sketch_model_dir)
    s.server.start()
    yield s
    s.server.stop()


def ids(edge: ScriptedEdge) -> set[str]:
    return {b.batch_id for b in edge.batches}


def test_stalled_edge_points_go_to_the_cloud_and_it_is_cancelled_and_avoided(
        setup: Setup) -> None:
    with setup.edge("mute-a") as mute:
        answer = setup.ask()  # before deadlines: waited forever
        assert {s["worker"] for s in answer["sections"]} == {CLOUD_WORKER_ID}
        sent = len(mute.batches)  # one batch per point, or one for all (the sketch streams)
        assert sent >= 1
        wait_for("the cancel of every stalled batch", lambda: set(mute.cancelled) == ids(mute))
        view = edges(setup.server.url)["mute-a"]
        assert view["deadlines_missed"] == sent and view["suspect"] and not view["healthy"]
        assert view["failure_rate"] > 0
        metrics = httpx.get(f"{setup.server.url}/metrics", timeout=30).text
        assert f"pice_edge_deadlines_missed_total {float(sent)}" in metrics
        assert 'pice_edges{kind="remote",state="suspect"} 1.0' in metrics
        again = setup.ask(sections=False)  # placement avoids the suspect edge: no live edge
        assert again["reason"] == "no edge worker available" and len(mute.batches) == sent
    assert mute.error is None


def test_stalled_edge_points_move_to_a_live_edge(setup: Setup, sketch_model_dir: Path) -> None:
    worker = EdgeWorker("good", HFGenerator(str(sketch_model_dir), max_context=1024))
    # "good" claims a slow rate: placement prefers the stalled edge, and good's own deadline
    # (from that rate) is minutes long
    with setup.edge("mute-b") as mute, setup.edge("good", worker, tokens_per_s=0.01) as good:
        answer = setup.ask()
        assert {s["worker"] for s in answer["sections"]} == {"good"}
        assert mute.batches and good.batches
        moved = {(t.index, t.candidate) for b in good.batches for t in b.tasks}
        assert moved >= {(t.index, t.candidate) for b in mute.batches for t in b.tasks}
        wait_for("the cancels", lambda: set(mute.cancelled) == ids(mute))
        assert edges(setup.server.url)["good"]["deadlines_missed"] == 0
    assert mute.error is None and good.error is None


def task(max_tokens: int) -> ExpansionTask:
    return ExpansionTask(request_id="r", question="q", sketch=["a"], index=0,
                         max_tokens=max_tokens)


def test_deadline_grows_with_budget_batch_and_rtt_and_shrinks_with_rate() -> None:
    cfg = DeadlineConfig(floor_s=1.0, multiplier=2.0, min_tokens_per_s=0.5)
    fast, slow = EdgeStats(100.0), EdgeStats(10.0)
    assert cfg.seconds(fast, [task(64)]) < cfg.seconds(slow, [task(64)])
    assert cfg.seconds(fast, [task(16)]) < cfg.seconds(fast, [task(64)])
    assert cfg.seconds(fast, [task(64)]) < cfg.seconds(fast, [task(64)] * 8)
    unmeasured = EdgeStats(0.0)
    assert cfg.seconds(unmeasured, [task(64)]) == 1.0 + 2.0 * 64 / 0.5  # the min rate
    fast.rtt_s = 3.0
    assert cfg.seconds(fast, [task(64)]) == pytest.approx(
        cfg.seconds(EdgeStats(100.0), [task(64)]) + 6.0)
    with pytest.raises(ValueError, match="multiplier"):
        DeadlineConfig(multiplier=0.5)
