"""`pice edge --group g` agents as real processes against a live server with no in-process edge:
the hub plans the group's layers, the group shows in /v1/edges as one edge (its first stage) and
answers progressive requests end to end; a stage killed (-9) mid-request is re-planned away and
the answer is the same as without the fault; when the survivors cannot hold the model the group
leaves the pool and requests still succeed. Tests run in order and share the cluster."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.edge.agent_procs import Agent, edges, make_tokens, wait_for

MEMBERS = ("m0", "m1", "m2")
# 256 MiB of runtime reserve + room for ONE layer of the 2-layer tiny model (with its KV):
# any member alone is too small, any two hold the model
MEMORY_MB = "286"


class GroupCluster:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp, self.model_dir = tmp, model_dir
        tokens_file = tmp / "edge-tokens.json"
        self.tokens = make_tokens(tokens_file, *MEMBERS)
        settings = ServeSettings(port=_free_port(), cloud_model=str(model_dir),
                                 edge_models=[str(model_dir)], local_edges=False,
                                 edge_tokens_file=tokens_file, edge_heartbeat_s=0.5,
                                 edge_lease_s=3.0, max_context=1024, default_max_tokens=64,
                                 guard=False, cache_dir=tmp / "cache")
        self.server = LiveServer(settings)
        self.url = self.server.url
        self.agents: dict[str, Agent] = {}

    def start(self, member: str) -> Agent:
        agent = Agent(self.url, self.tokens[member], member, self.model_dir, self.tmp / "cache",
                      self.tmp, extra=("--group", "g", "--group-listen", "127.0.0.1:0",
                                       "--group-memory-mb", MEMORY_MB))
        self.agents[member] = agent
        return agent

    def ask(self) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/v1/progressive", timeout=300,
                       json={"question": SKETCH_QUESTIONS[0], "mode": "progressive",
                             "max_tokens": 60, "stream": False})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def serving_head(self) -> str | None:
        healthy = [i for i, e in edges(self.url).items() if e["healthy"]]
        assert len(healthy) <= 1, healthy  # a group is ONE edge
        return healthy[0] if healthy else None

    def logs(self) -> str:
        return "\n".join(f"--- {i}\n{a.log()[-3000:]}" for i, a in self.agents.items())


@pytest.fixture(scope="module")
def cluster(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[GroupCluster]:
    c = GroupCluster(tmp_path_factory.mktemp("group"), sketch_model_dir)
    c.server.start()
    yield c
    for a in c.agents.values():
        a.stop()
    c.server.stop()


def sections(answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["worker"], s["text"]) for s in answer["sections"]]


BASELINE: dict[str, Any] = {}


def test_group_answers_a_progressive_request_as_one_edge(cluster: GroupCluster) -> None:
    cluster.start("m0")
    cluster.start("m1")
    try:
        head = wait_for("the group to serve", cluster.serving_head, timeout=600)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    assert head in ("m0", "m1")
    answer = cluster.ask()
    assert {w for w, _ in sections(answer)} == {head}, cluster.logs()
    BASELINE.update(head=head, sections=sections(answer))


def planned(agent: Agent) -> str | None:
    """'ready' or 'none': what the member's log says of its part in the latest plan."""
    lines = [ln for ln in agent.log().splitlines() if "group g epoch" in ln]
    return None if not lines else ("ready" if lines[-1].endswith("ready") else "none")


def test_a_killed_stage_is_replanned_and_the_answer_is_unchanged(cluster: GroupCluster) -> None:
    spare = cluster.start("m2")  # joins; the group is re-planned (2 layers: it gets none)
    head = BASELINE["head"]
    wait_for("the spare to be planned", lambda: planned(spare), timeout=600)
    wait_for("the group to serve again", lambda: cluster.serving_head() == head)
    assert set(edges(cluster.url)) == {head}  # members behind the first stage are not edges
    victim = next(m for m in MEMBERS if m != head and planned(cluster.agents[m]) == "ready")
    cluster.agents[victim].signal(signal.SIGSTOP)  # so that the kill lands mid-request
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(cluster.ask)
        wait_for("a batch on the group", lambda: edges(cluster.url)[head]["inflight"] > 0)
        cluster.agents[victim].proc.kill()  # kill -9
        cluster.agents[victim].proc.wait(30)
        answer = future.result(timeout=600)
    assert sections(answer) == BASELINE["sections"], cluster.logs()


def test_survivors_too_small_take_the_group_out_of_the_pool(cluster: GroupCluster) -> None:
    head = BASELINE["head"]
    spare = next(m for m in MEMBERS if m != head and cluster.agents[m].proc.poll() is None)
    wait_for("the group to serve on two", lambda: cluster.serving_head() == head)
    cluster.agents[spare].proc.kill()
    wait_for("the group to leave the pool", lambda: cluster.serving_head() is None)
    answer = cluster.ask()  # the points go to the cloud
    assert head not in {w for w, _ in sections(answer)}
    assert "too small" in cluster.agents[head].log() or "hold at most" in \
        cluster.agents[head].log(), cluster.logs()
