"""pice on Ray Serve: a real local Ray cluster on loopback (one per module, 2 CPUs), two gateway
and two cloud-model replicas of the tiny sketch model, and a real edge agent process. A request
through Serve is answered; the cloud replicas share load and keep sessions; a replica killed
mid-stream loses no request; an agent held by one gateway replica serves a request entering
through the other. Waits use deadlines; no timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from pice.cloud.serve.app import application  # noqa: E402
from pice.cloud.serve.registry import NAME, NAMESPACE  # noqa: E402
from pice.cloud.serve.routing import rank  # noqa: E402
from pice.cloud.serve.settings import RaySettings  # noqa: E402
from pice.shared.config import ServeSettings  # noqa: E402
from tests.conftest import SKETCH_QUESTIONS, _free_port  # noqa: E402
from tests.edge.agent_procs import WAIT_S, Agent, make_tokens, wait_for  # noqa: E402
from tests.factories import SKETCH_ANSWER  # noqa: E402

SKETCH = [line.split(". ", 1)[1] for line in SKETCH_ANSWER.splitlines()]


class Cluster:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.tokens = make_tokens(tmp / "tokens.json", "ray-agent")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = ServeSettings(
            port=self.port, cloud_model=str(model_dir), edge_models=[str(model_dir)],
            local_edges=False, edge_tokens_file=tmp / "tokens.json", edge_heartbeat_s=0.5,
            edge_lease_s=30.0, max_context=1024, default_max_tokens=64, guard=False,
            cache_dir=tmp / "cache", threads=1)
        self.ray = RaySettings(gateway_min_replicas=2, gateway_max_replicas=2,
                               cloud_min_replicas=2, cloud_max_replicas=2,
                               gateway_num_cpus=0.25, cloud_num_cpus=0.25)

    def start(self) -> None:
        ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE,
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(application(self.settings, self.ray), name="pice", route_prefix="/",
                  blocking=False)
        ready: set[str] = set()

        def both_ready() -> bool:
            try:
                r = httpx.get(f"{self.url}/ready", timeout=5)
            except httpx.TransportError:
                return False
            if r.status_code == 200:
                ready.add(r.headers["x-pice-replica"])
            return len(ready) == 2

        wait_for("both gateway replicas to load", both_ready, timeout=2 * WAIT_S)

    def stop(self) -> None:
        serve.shutdown()
        ray.shutdown()

    def cloud_replicas(self) -> dict[str, int]:
        """Cloud replica id → pid (asked through the deployment handle until both answer)."""
        handle = serve.get_deployment_handle("CloudModel", app_name="pice")
        found: dict[str, int] = {}

        def both() -> bool:
            try:
                info = handle.info.remote().result(timeout_s=60)
            except ray.exceptions.RayActorError:  # a replica just died: ask again
                return False
            found[info["replica"]] = info["pid"]
            return len(found) == 2

        wait_for("both cloud replicas", both)
        return found


@pytest.fixture(scope="module")
def cluster(sketch_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ray"), sketch_model_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def chat(url: str, mode: str, session: str | None = None, max_tokens: int = 24,
         ) -> httpx.Response:
    headers = {"x-pice-session": session} if session else {}
    return httpx.post(f"{url}/v1/chat/completions", timeout=WAIT_S, headers=headers, json={
        "messages": [{"role": "user", "content": SKETCH_QUESTIONS[0]}],
        "max_tokens": max_tokens, "pice": {"mode": mode}})


def test_request_through_serve_is_answered(cluster: Cluster) -> None:
    r = chat(cluster.url, "cloud")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pice"]["mode"] == "cloud"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    assert r.headers["x-pice-cloud-replicas"]  # answered by a cloud-model replica


def test_two_cloud_replicas_share_load_and_keep_sessions(cluster: Cluster) -> None:
    replicas = set(cluster.cloud_replicas())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(cluster.url, "cloud"), range(16)))
    assert all(a.status_code == 200 for a in answers)
    used = {a.headers["x-pice-cloud-replicas"] for a in answers}
    assert used == replicas  # 16 fresh keys over 2 replicas: both serve
    # one session sticks to one replica
    pinned = {chat(cluster.url, "cloud", session="conversation-7").headers[
        "x-pice-cloud-replicas"] for _ in range(4)}
    assert pinned == {rank("conversation-7", sorted(replicas))[0]}


def start_agent(cluster: Cluster, edge_id: str) -> Agent:
    """A `pice edge` process. Spawned without a preexec hook: this process runs Ray's gRPC
    threads, and a forked child that runs Python before exec can die in gRPC's fork handlers
    (vfork + exec runs none)."""
    agent = Agent.__new__(Agent)
    agent.edge_id = edge_id
    agent.log_path = cluster.tmp / f"agent-{edge_id}.log"
    cmd = [sys.executable, "-m", "pice", "edge", "--cloud", cluster.url, "--edge-id", edge_id,
           "--model", str(cluster.model_dir), "--slots", "4", "--cache-dir",
           str(cluster.tmp / "agent-cache"), "--threads", "1"]
    with agent.log_path.open("w") as log:
        agent.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PICE_EDGE_TOKEN":
                                           cluster.tokens[edge_id]})
    return agent


def test_agent_on_one_gateway_serves_requests_entering_another(cluster: Cluster) -> None:
    agent = start_agent(cluster, "ray-agent")
    registry = ray.get_actor(NAME, namespace=NAMESPACE)
    try:
        def holder() -> str | None:
            assert agent.proc.poll() is None, agent.log()
            snap = json.loads(ray.get(registry.snapshot.remote()))
            return next((r for r, edges in snap.items() if "ray-agent" in edges), None)

        held_by = wait_for("the agent to register with a gateway replica", holder)

        def other_sees_it() -> bool:  # the other replica relays it after its next heartbeat
            r = httpx.get(f"{cluster.url}/v1/edges", timeout=30)
            return r.headers["x-pice-replica"] != held_by and any(
                e["edge_id"] == "ray-agent" and e["healthy"] for e in r.json()["data"])

        wait_for("the other gateway replica to list the agent", other_sees_it)
        served: dict[str, Any] = {}

        def entered_elsewhere() -> bool:
            r = httpx.post(f"{cluster.url}/v1/progressive", timeout=WAIT_S, json={
                "question": SKETCH_QUESTIONS[0], "mode": "progressive", "max_tokens": 48,
                "stream": False})
            assert r.status_code == 200, r.text
            if r.headers["x-pice-replica"] == held_by:
                return False
            served.update(r.json())
            return True

        wait_for("a request entering the other gateway replica", entered_elsewhere)
        assert served["mode"] == "progressive", served["reason"]
        assert served["sketch"] == SKETCH
        assert {s["worker"] for s in served["sections"]} == {"ray-agent"}
    finally:
        agent.stop()


def stream_text(url: str, session: str, first: threading.Barrier) -> dict[str, Any]:
    """Stream a long cloud answer; wait at the barrier after the first words."""
    text, errors, finish = "", [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=WAIT_S,
                      headers={"x-pice-session": session}, json={
                          "messages": [{"role": "user", "content": SKETCH_QUESTIONS[1]}],
                          "max_tokens": 600, "stream": True, "pice": {"mode": "cloud"}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            choice = chunk["choices"][0]
            delta = choice["delta"].get("content") or ""
            if delta and not text:
                first.wait(WAIT_S)
            text += delta
            finish = choice["finish_reason"] or finish
    return {"text": text, "errors": errors, "finish": finish}


def test_killing_a_cloud_replica_mid_stream_loses_no_request(cluster: Cluster) -> None:
    replicas = cluster.cloud_replicas()
    victim = sorted(replicas)[0]
    ids = sorted(replicas)
    keys = [k for k in (f"s{i}" for i in range(100)) if rank(k, ids)[0] == victim][:3]
    keys += [k for k in (f"t{i}" for i in range(100)) if rank(k, ids)[0] != victim][:3]
    first = threading.Barrier(len(keys) + 1)
    with ThreadPoolExecutor(len(keys)) as pool:
        futures = [pool.submit(stream_text, cluster.url, k, first) for k in keys]
        first.wait(WAIT_S)  # every stream has its first words: all in flight
        os.kill(replicas[victim], signal.SIGKILL)
        results = [f.result(WAIT_S) for f in futures]
    for res in results:
        assert res["errors"] == [] and res["finish"] in ("stop", "length"), res
        assert res["text"]
