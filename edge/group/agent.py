"""`pice edge --group NAME`: an edge agent that serves one stage of an edge group. It registers
with the hub as a group member (free memory, measured FLOP/s, its data-plane address, its model's
shape), applies each plan the hub sends (loads its layer range, dials its next stage) and answers
with AgentGroupReady. On the first stage, the hub's batches run through the whole group."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from pice.edge.agent import EdgeAgent
from pice.edge.agent_config import AgentConfig
from pice.edge.expander import EdgeWorker
from pice.edge.group.generator import GroupGenerator
from pice.edge.group.node import StageConfig, StageNode
from pice.shared.config import ServeSettings
from pice.shared.protocol import (
    AgentGroupReady,
    AgentRegister,
    GroupMember,
    GroupModelShape,
    HubGroupPlan,
)

log = logging.getLogger(__name__)


def measure_flops(seconds: float = 0.2, n: int = 256) -> float:
    """fp32 matmul FLOP/s on this member (with its torch thread setting)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        torch.mm(a, b)
        count += 1
    return 2.0 * n ** 3 * count / elapsed


def free_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def model_shape(path: Path, dtype_bytes: int = 4) -> GroupModelShape:
    raw = json.loads((path / "config.json").read_text())
    cfg = raw.get("text_config", raw)
    heads = int(cfg["num_attention_heads"])
    return GroupModelShape(
        num_hidden_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings",
                                         cfg.get("model_type") == "gemma3_text")),
        dtype_bytes=dtype_bytes)


class GroupAgent(EdgeAgent):
    def __init__(self, cfg: AgentConfig, group: str, model_dir: Path, generator: GroupGenerator,
                 node: StageNode, advertise: str, free_bytes: int, flops_per_s: float) -> None:
        super().__init__(cfg, {cfg.models[0]: EdgeWorker(cfg.edge_id, generator)})
        self.group, self.model_dir, self.node = group, model_dir, node
        self.generator = generator
        self._reports: set[asyncio.Task[None]] = set()
        self.member = GroupMember(name=group, free_bytes=free_bytes, flops_per_s=flops_per_s,
                                  data_addr=advertise, shape=model_shape(model_dir))

    def measure(self) -> float:
        return 0.0  # a stage alone generates nothing: the hub learns the rate from results

    def register_message(self) -> AgentRegister:
        return super().register_message().model_copy(update={"group": self.member})

    async def on_message(self, ws: ClientConnection, msg: BaseModel) -> None:
        if not isinstance(msg, HubGroupPlan):
            await super().on_message(ws, msg)
            return
        if msg.index < 0 or msg.n_stages == 0:
            log.warning("group %s epoch %d: no range here: %s", msg.group, msg.epoch, msg.reason)
            self.node.disband(msg.reason or "no range in the group's plan")
            return
        cfg = StageConfig(group=msg.group, epoch=msg.epoch, model=str(self.model_dir),
                          index=msg.index, n_stages=msg.n_stages, start=msg.start, end=msg.end,
                          next_addr=msg.next_addr, token=msg.token, num_blocks=msg.num_blocks,
                          block_size=msg.block_size, micro_batches=msg.micro_batches,
                          max_model_len=self.generator.max_context)
        self.node.configure(cfg)
        task = asyncio.create_task(self._report(ws, msg.epoch))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, ws: ClientConnection, epoch: int) -> None:
        problem = await asyncio.to_thread(self.node.wait_ready, epoch)
        if problem is not None:
            log.error("group %s epoch %d not applied: %s", self.group, epoch, problem)
        await self._send(ws, AgentGroupReady(group=self.group, epoch=epoch, error=problem))


def run_group_agent(cfg: AgentConfig, model_dir: Path, group: str, listen: str,
                    advertise: str | None, memory_mb: int | None, max_context: int) -> int:
    host, port = listen.rsplit(":", 1)
    generator = GroupGenerator(cfg.models[0], model_dir, max_context)
    node = StageNode(host, int(port), eos_ids=generator.chat.eos_ids,
                     decode=generator.chat.decode)
    generator.node = node
    advertise_host = advertise or (host if host not in ("0.0.0.0", "") else "127.0.0.1")
    addr = f"{advertise_host}:{node.addr.rsplit(':', 1)[1]}"
    free = memory_mb * 2**20 if memory_mb is not None else free_memory_bytes()
    flops = measure_flops()
    log.info("group %s member %s: %.0f MiB free, %.2f GFLOP/s, data plane %s", group,
             cfg.edge_id, free / 2**20, flops / 1e9, addr)
    agent = GroupAgent(cfg, group, model_dir, generator, node, addr, free, flops)
    try:
        return asyncio.run(agent.run())
    finally:
        node.close()


def run_group_agent_cli(cfg: AgentConfig, settings: ServeSettings, group: str, listen: str,
                        advertise: str | None, memory_mb: int | None) -> int:
    """`pice edge --group NAME`: resolve the model (a local directory of safetensors: the
    stages read only their own layers from it), then serve as a group member."""
    from pice.shared.models.resolve import resolve_model

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    resolved = resolve_model(cfg.models[0], settings.cache_dir)
    path = Path(resolved.path)
    if not (path / "config.json").is_file():
        log.error("edge groups need a local model directory, got %s", resolved.path)
        return 2
    return run_group_agent(cfg, path, group, listen, advertise, memory_mb, settings.max_context)
