"""Edge groups at the hub: agents that registered with `--group NAME` pool their devices to serve
one model split by layers. On every membership change (after `settle_s`, so a group starting up
is planned once) the hub plans contiguous layer ranges from the members' free memory and measured
speed (scheduler/layer_plan.py), keeping the current first stage first when it survives, and
sends each member its range, its next stage's address and a fresh group token. The group serves
(its first stage appears to the edge pool as one edge for the model) once every stage reported
the plan applied. When the survivors cannot hold the model, every member is told so, the first
stage fails its requests and the pool moves their points to other edges or the cloud."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pice.scheduler.layer_plan import LayerPlan, Member, PlanConfig, plan_layers, shape_from_config
from pice.shared.protocol import AgentGroupReady, GroupMember, HubGroupPlan

if TYPE_CHECKING:
    from pice.cloud.edge_hub import RemoteEdge

log = logging.getLogger(__name__)


@dataclass
class EdgeGroup:
    name: str
    model: str  # model spec the group serves (its first member's)
    members: dict[str, tuple[RemoteEdge, GroupMember]] = field(default_factory=dict)
    epoch: int = 0
    plan: LayerPlan | None = None
    stages: list[str] = field(default_factory=list)  # member ids in pipeline order
    ready: set[str] = field(default_factory=set)  # stages that applied the current epoch
    errors: dict[str, str] = field(default_factory=dict)  # member → why it failed the plan
    live_head: str | None = None  # first stage of the last plan every stage applied
    replan: asyncio.Task[None] | None = None

    @property
    def head(self) -> RemoteEdge | None:
        if not self.stages or self.stages[0] not in self.members:
            return None
        return self.members[self.stages[0]][0]

    @property
    def serving(self) -> bool:
        """Takes work: every stage applied the plan, or a re-plan is under way behind the same
        first stage (it queues new requests and replays the running ones once re-planned)."""
        return bool(self.stages) and not self.errors and (
            self.ready >= set(self.stages) or self.live_head == self.stages[0])


class GroupRegistry:
    def __init__(self, settle_s: float = 0.5, plan_cfg: PlanConfig | None = None,
                 block_size: int = 16) -> None:
        self.settle_s = settle_s
        self.plan_cfg = plan_cfg or PlanConfig()
        self.block_size = block_size
        self.groups: dict[str, EdgeGroup] = {}

    def group_of(self, edge: RemoteEdge) -> EdgeGroup | None:
        name = getattr(edge, "group", None)
        return self.groups.get(name) if name else None

    def visible(self, edge: RemoteEdge) -> bool:
        """Whether the pool sees this agent: plain agents always, group members only as their
        group's first stage."""
        group = self.group_of(edge)
        return group is None or group.head is edge

    def healthy(self, edge: RemoteEdge) -> bool:
        group = self.group_of(edge)
        return group is None or (group.head is edge and group.serving)

    def join(self, edge: RemoteEdge, member: GroupMember, model: str) -> None:
        group = self.groups.setdefault(member.name, EdgeGroup(member.name, model))
        group.members[edge.edge_id] = (edge, member)
        self._schedule(group)

    def leave(self, edge: RemoteEdge, reason: str) -> None:
        group = self.group_of(edge)
        if group is None or group.members.get(edge.edge_id, (None,))[0] is not edge:
            return
        del group.members[edge.edge_id]
        log.warning("group %s: member %s left (%s)", group.name, edge.edge_id, reason)
        if not group.members:
            if group.replan is not None:
                group.replan.cancel()
            del self.groups[group.name]
            return
        if edge.edge_id in group.stages:
            group.ready.clear()  # the plan lost a stage; the re-plan follows
        self._schedule(group)

    def on_ready(self, edge: RemoteEdge, msg: AgentGroupReady) -> None:
        group = self.groups.get(msg.group)
        if group is None or msg.epoch != group.epoch or edge.edge_id not in group.stages:
            return
        if msg.error:
            group.errors[edge.edge_id] = msg.error
            log.error("group %s: %s could not apply plan %d: %s", group.name, edge.edge_id,
                      msg.epoch, msg.error)
            return
        group.ready.add(edge.edge_id)
        if group.ready >= set(group.stages):
            group.live_head = group.stages[0]
            log.info("group %s serving %s: %s", group.name, group.model, group.plan.describe()
                     if group.plan else "")

    def _schedule(self, group: EdgeGroup) -> None:
        if group.replan is not None:
            group.replan.cancel()
        group.replan = asyncio.get_running_loop().create_task(self._replan_later(group))

    async def _replan_later(self, group: EdgeGroup) -> None:
        await asyncio.sleep(self.settle_s)
        group.replan = None
        await self.replan(group)

    async def replan(self, group: EdgeGroup) -> None:
        """Plan the group over its members now and send every member its part."""
        members = [(e, m) for e, m in group.members.values()]
        same = [(e, m) for e, m in members if e.models[0] == group.model]
        head = group.head
        shape = shape_from_config(same[0][1].shape.model_dump(), same[0][1].shape.dtype_bytes) \
            if same else None
        plan = plan_layers(shape, [Member(e.edge_id, m.free_bytes, m.flops_per_s)
                                   for e, m in same], self.plan_cfg,
                           first=head.edge_id if head is not None else None) \
            if shape is not None else LayerPlan((), (), "no member serves the group's model")
        group.epoch += 1
        group.plan, group.ready, group.errors = plan, set(), {}
        group.stages = [s.member_id for s in plan.stages]
        if not group.stages or group.stages[0] != group.live_head:
            group.live_head = None
        token = secrets.token_hex(16)
        reasons = dict(plan.unused)
        for e, _ in members:
            if e.models[0] != group.model:
                reasons[e.edge_id] = f"serves {e.models[0]}, the group serves {group.model}"
        log.info("group %s plan %d: %s", group.name, group.epoch, plan.describe())
        n = len(plan.stages)
        sends = []
        for edge, _ in members:
            if edge.edge_id in group.stages:
                i = group.stages.index(edge.edge_id)
                s = plan.stages[i]
                nxt = group.members[group.stages[(i + 1) % n]][1].data_addr if n > 1 else None
                msg = HubGroupPlan(group=group.name, epoch=group.epoch, index=i, n_stages=n,
                                   start=s.start, end=s.end, next_addr=nxt, token=token,
                                   num_blocks=self.plan_cfg.kv_tokens // self.block_size,
                                   block_size=self.block_size)
            else:
                msg = HubGroupPlan(group=group.name, epoch=group.epoch, n_stages=n,
                                   reason=reasons.get(edge.edge_id, plan.problem))
            sends.append(self._send(edge, msg))
        await asyncio.gather(*sends)

    @staticmethod
    async def _send(edge: RemoteEdge, msg: HubGroupPlan) -> None:
        with contextlib.suppress(Exception):  # a dead member is dropped by its own session
            await edge.send(msg)
