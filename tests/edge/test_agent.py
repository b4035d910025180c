"""Real `pice edge` agent processes on loopback against a live server that has no in-process
edge workers: requests use the agents; an agent killed (-9) mid-expansion, frozen (SIGSTOP) or
drained (SIGTERM) never loses a request; a restarted or thawed agent rejoins; bad and revoked
tokens are refused. The tests run in order and share the server and two agents."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.edge.agent_procs import Agent, edges, make_tokens, wait_for, wait_registered

A, B = "agent-a", "agent-b"


class Cluster:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.tokens_file = tmp / "edge-tokens.json"
        self.tokens = make_tokens(self.tokens_file, A, B)
        settings = ServeSettings(port=_free_port(), cloud_model=str(model_dir),
                                 edge_models=[str(model_dir)], local_edges=False,
                                 edge_tokens_file=self.tokens_file, edge_heartbeat_s=0.5,
                                 edge_lease_s=3.0, max_context=1024, default_max_tokens=64,
                                 guard=False,  # keep the edges' sections (no cloud repair)
                                 cache_dir=tmp / "cache")
        self.server = LiveServer(settings)
        self.url = self.server.url
        self.agents: dict[str, Agent] = {}
        self.killed = self.drained = ""  # ids of agents earlier tests took down
        self.pool = ThreadPoolExecutor(2)

    def start_agent(self, edge_id: str, token: str | None = None) -> Agent:
        agent = Agent(self.url, token or self.tokens[edge_id], edge_id, self.model_dir,
                      self.tmp / "cache", self.tmp)
        self.agents[edge_id] = agent
        return agent

    def ask(self, question: str = SKETCH_QUESTIONS[0]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/v1/progressive", timeout=180,
                       json={"question": question, "mode": "progressive", "max_tokens": 60,
                             "stream": False})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def ask_later(self) -> Future[dict[str, Any]]:
        return self.pool.submit(self.ask)

    def freeze_all_then_pick_busy(self) -> tuple[Future[dict[str, Any]], Agent, Agent]:
        """Freeze both agents, send a request and wait until one holds a batch: (the pending
        answer, the busy agent, the other). The scheduler places points by cost, so which one
        is busy is read from the hub, not assumed."""
        for agent in self.agents.values():
            agent.signal(signal.SIGSTOP)
        pending = self.ask_later()
        busy = wait_for("a batch on a frozen agent", lambda: next(
            (i for i, e in edges(self.url).items() if e["inflight"]), None))
        other = next(a for i, a in self.agents.items() if i != busy and a.proc.poll() is None)
        return pending, self.agents[busy], other


@pytest.fixture(scope="module")
def cluster(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("agents"), sketch_model_dir)
    c.server.start()
    for edge_id in (A, B):
        c.start_agent(edge_id)
    wait_registered(c.url, c.agents[A], c.agents[B])
    yield c
    for agent in c.agents.values():
        agent.stop()
    c.pool.shutdown()
    c.server.stop()


def workers(answer: dict[str, Any]) -> list[str]:
    assert answer["mode"] == "progressive", answer
    assert [s["index"] for s in sorted(answer["sections"], key=lambda s: s["index"])] == \
        [0, 1, 2]
    return [s["worker"] for s in answer["sections"]]


def test_progressive_request_is_expanded_by_the_agents(cluster: Cluster) -> None:
    answer = cluster.ask()
    assert set(workers(answer)) <= {A, B}  # no in-process edge, no cloud fallback
    assert answer["text"].startswith("1. Fixed sleep schedule")
    listed = wait_for("round-trip measurements", lambda: (
        e := edges(cluster.url)) and all(e[i]["rtt_s"] > 0 for i in (A, B)) and e)
    for edge_id in (A, B):
        assert listed[edge_id]["kind"] == "remote" and listed[edge_id]["slots"] == 4
        assert listed[edge_id]["tokens_per_s"] > 0


def test_agent_killed_mid_expansion_loses_no_point(cluster: Cluster) -> None:
    pending, busy, other = cluster.freeze_all_then_pick_busy()
    busy.signal(signal.SIGKILL)
    other.signal(signal.SIGCONT)
    assert busy.wait() == -signal.SIGKILL
    assert set(workers(pending.result(timeout=180))) == {other.edge_id}
    wait_for("the killed agent to leave the registry",
             lambda: busy.edge_id not in edges(cluster.url))
    cluster.killed = busy.edge_id


def test_restarted_agent_rejoins(cluster: Cluster) -> None:
    agent = cluster.start_agent(cluster.killed)
    wait_registered(cluster.url, agent)
    assert set(workers(cluster.ask())) <= {A, B}


def test_frozen_agent_lease_expires_and_its_work_moves(cluster: Cluster) -> None:
    pending, busy, other = cluster.freeze_all_then_pick_busy()
    other.signal(signal.SIGCONT)
    assert set(workers(pending.result(timeout=180))) == {other.edge_id}  # moved off `busy`
    assert busy.edge_id not in edges(cluster.url)  # declared dead
    busy.signal(signal.SIGCONT)  # thawed, it finds its connection closed and reconnects
    wait_registered(cluster.url, busy)
    assert set(workers(cluster.ask())) <= {A, B}


def test_sigterm_drains_then_exits_zero(cluster: Cluster) -> None:
    pending, busy, other = cluster.freeze_all_then_pick_busy()
    other.signal(signal.SIGCONT)
    busy.signal(signal.SIGTERM)
    busy.signal(signal.SIGCONT)
    assert busy.wait() == 0
    assert set(workers(pending.result(timeout=180))) <= {A, B}
    assert "drain" in busy.log()
    wait_for("the drained agent to leave the registry",
             lambda: busy.edge_id not in edges(cluster.url))
    cluster.drained = busy.edge_id


def test_unknown_token_is_refused_and_the_agent_exits_2(cluster: Cluster) -> None:
    bad = cluster.start_agent("agent-x", token="pice-edge.000000000000.not-a-token")
    assert bad.wait() == 2
    assert "refused" in bad.log() and "401" in bad.log()
    assert "agent-x" not in edges(cluster.url)


def test_revoked_token_drops_the_live_agent_and_is_refused(cluster: Cluster) -> None:
    [live] = [a for a in cluster.agents.values() if a.proc.poll() is None]
    out = subprocess.run([sys.executable, "-m", "pice", "edge-token", "revoke", live.edge_id,
                          "--file", str(cluster.tokens_file)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert live.wait() == 2  # dropped at its next heartbeat; its reconnect is refused
    assert live.edge_id not in edges(cluster.url)
    answer = cluster.ask()  # no edge left: the cloud answers in full
    assert answer["mode"] == "cloud" and answer["text"]
