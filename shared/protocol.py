"""Every message that passes between the cloud and an edge worker. One file, each field
commented; in-process workers exchange the same objects the network transport will carry."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pice.shared.errors import WireFormatError


class ExpansionTask(BaseModel):
    """Cloud → edge: expand one point of a sketch."""

    request_id: str  # the client request this point belongs to
    question: str  # the user's question, verbatim (last user message)
    sketch: list[str]  # every point of the sketch, in order (context for the expansion)
    index: int = Field(ge=0)  # which point to expand (0-based into `sketch`)
    max_tokens: int = Field(ge=1)  # token budget for this point's expansion
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 → greedy
    seed: int | None = None  # sampling seed, when the client gave one
    adapter: str | None = None  # LoRA adapter to apply (None → base model)
    model: str | None = None  # model spec that must run it (None → any edge model)
    candidate: int = Field(0, ge=0)  # ensemble candidate number for this point (0 → first)


class ExpansionResult(BaseModel):
    """Edge → cloud: the expansion of one point."""

    request_id: str  # echoes ExpansionTask.request_id
    index: int  # echoes ExpansionTask.index
    candidate: int = 0  # echoes ExpansionTask.candidate
    adapter: str | None = None  # LoRA adapter that was applied (None → base model)
    text: str  # the expanded point (1–2 sentences), without the number
    worker: str  # id of the edge worker that produced it
    model: str  # model spec the worker ran
    tokens: int  # tokens generated for this point
    mean_logprob: float  # mean per-token log-probability (ensemble selection uses it)
    logprobs: list[float] = Field(default_factory=list)  # per-token log-probabilities
    finish_reason: str  # "stop" (natural end) | "length" (hit max_tokens)
    seconds: float  # from the start of its batch until this point finished


# ─── Edge agent ↔ cloud hub (WebSocket) ──────────────────────────────────────────────────────
# The agent dials the hub and presents its token in the handshake; then every frame is one JSON
# text object below, size-capped and validated on receipt (never pickle). "agent →" frames
# renew the agent's lease; a lease that runs out declares the agent dead.

AGENT_PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024  # larger frames are refused and the connection closed
_EDGE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AgentRegister(BaseModel):
    """Agent → hub, the first frame: what this edge offers."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["register"] = "register"
    version: int = AGENT_PROTOCOL_VERSION  # must equal the hub's AGENT_PROTOCOL_VERSION
    edge_id: str = Field(pattern=_EDGE_ID)  # must match the edge its token was issued to
    models: list[str] = Field(min_length=1, max_length=16)  # model specs it runs
    adapters: list[str] = Field(default_factory=list, max_length=4096)  # LoRA adapters it serves
    slots: int = Field(ge=1, le=4096)  # points it runs at once (the hub never sends more)
    tokens_per_s: float = Field(0.0, ge=0.0)  # decode rate of one stream, measured at start
    group: GroupMember | None = None  # set: a member of an edge group (`pice edge --group`)


class GroupModelShape(BaseModel):
    """A group member's model, as its config.json describes it (the hub plans layers with it)."""

    model_config = ConfigDict(extra="forbid")
    num_hidden_layers: int = Field(ge=1, le=4096)
    hidden_size: int = Field(ge=1, le=1 << 16)
    intermediate_size: int = Field(ge=1, le=1 << 20)
    num_attention_heads: int = Field(ge=1, le=4096)
    num_key_value_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=4096)
    vocab_size: int = Field(ge=1, le=1 << 22)
    tie_word_embeddings: bool
    dtype_bytes: int = Field(4, ge=1, le=8)  # bytes per weight as the member would run it


class GroupMember(BaseModel):
    """What an edge-group member offers (inside its AgentRegister)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_EDGE_ID)  # the group; members of one group share a LAN
    free_bytes: int = Field(ge=0)  # memory it can give the model now
    flops_per_s: float = Field(ge=0.0)  # measured: a short fp32 matmul at start
    data_addr: str = Field(pattern=r"^[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5}$")  # its stage listener
    shape: GroupModelShape  # of models[0], the model the group serves


class HubGroupPlan(BaseModel):
    """Hub → group member: the group's plan (a new epoch), or that the member or the whole group
    has no range in it (`index` -1, with `reason`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["group_plan"] = "group_plan"
    group: str = Field(pattern=_EDGE_ID)
    epoch: int = Field(ge=1)  # plan number; stages drop frames and links of older epochs
    index: int = Field(-1, ge=-1)  # this member's stage, 0 = first (-1: no range, see reason)
    n_stages: int = Field(0, ge=0)  # 0: the group cannot hold the model and left the pool
    start: int = Field(0, ge=0)  # first layer it holds (inclusive)
    end: int = Field(0, ge=0)  # last layer it holds (exclusive)
    next_addr: str | None = None  # data_addr of the next stage (the last's is the first's)
    token: str = Field("", max_length=256)  # per-group, per-epoch secret of the data plane
    num_blocks: int = Field(0, ge=0)  # KV blocks every stage allocates (the first admits in it)
    block_size: int = Field(16, ge=1, le=128)  # tokens per KV block
    micro_batches: int = Field(0, ge=0)  # decode micro-batches in flight (0: one per stage)
    reason: str | None = Field(None, max_length=2000)  # why no range / no plan


class AgentGroupReady(BaseModel):
    """Group member → hub: plan `epoch` is applied here (layers loaded, next stage dialled)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["group_ready"] = "group_ready"
    group: str = Field(pattern=_EDGE_ID)
    epoch: int = Field(ge=1)
    error: str | None = Field(None, max_length=2000)  # set: it could not apply the plan


class HubWelcome(BaseModel):
    """Hub → agent: registration accepted; keep the lease with heartbeats."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["welcome"] = "welcome"
    heartbeat_s: float = Field(gt=0)  # send a heartbeat at least this often
    lease_s: float = Field(gt=0)  # silence this long → declared dead, work moved elsewhere


class AgentHeartbeat(BaseModel):
    """Agent → hub, every heartbeat_s."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["heartbeat"] = "heartbeat"
    inflight: int = Field(0, ge=0)  # points running on the agent now
    tokens_per_s: float = Field(0.0, ge=0.0)  # latest measured decode rate of one stream


class HubPing(BaseModel):
    """Hub → agent: answer with a pong at once (the hub measures the round trip)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ping"] = "ping"
    seq: int = Field(ge=0)


class AgentPong(BaseModel):
    """Agent → hub: answers a ping."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["pong"] = "pong"
    seq: int = Field(ge=0)  # echoes HubPing.seq


class HubTasks(BaseModel):
    """Hub → agent: expand these points as one batch."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["tasks"] = "tasks"
    batch_id: str = Field(min_length=1, max_length=64)
    tasks: list[ExpansionTask] = Field(min_length=1, max_length=4096)


class HubCancel(BaseModel):
    """Hub → agent: drop a batch (its request ended, or its points moved elsewhere: the edge
    failed or missed the batch's deadline); the agent stops its work and sends nothing more."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["cancel"] = "cancel"
    batch_id: str = Field(min_length=1, max_length=64)


class AgentResult(BaseModel):
    """Agent → hub: one point of a batch is done (sent the moment it finishes)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["result"] = "result"
    batch_id: str = Field(min_length=1, max_length=64)
    result: ExpansionResult


class AgentBatchDone(BaseModel):
    """Agent → hub: a batch ended; with an error, its undelivered points must move."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["batch_done"] = "batch_done"
    batch_id: str = Field(min_length=1, max_length=64)
    error: str | None = Field(None, max_length=2000)


class AgentDrain(BaseModel):
    """Agent → hub: shutting down: send no more work; the listed batches are handed back."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["drain"] = "drain"
    handed_back: list[str] = Field(default_factory=list, max_length=4096)  # batch ids


AgentMessage = Annotated[AgentRegister | AgentHeartbeat | AgentPong | AgentResult
                         | AgentBatchDone | AgentDrain | AgentGroupReady,
                         Field(discriminator="type")]
HubMessage = Annotated[HubWelcome | HubPing | HubTasks | HubCancel | HubGroupPlan,
                       Field(discriminator="type")]
_AGENT = TypeAdapter[AgentMessage](AgentMessage)
_HUB = TypeAdapter[HubMessage](HubMessage)


def _check_size(frame: str | bytes) -> None:
    size = len(frame.encode() if isinstance(frame, str) else frame)
    if size > MAX_FRAME_BYTES:
        raise WireFormatError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte cap")


def decode_agent_message(frame: str | bytes) -> AgentMessage:
    """Parse and validate an agent → hub frame; raise WireFormatError naming the problem."""
    _check_size(frame)
    try:
        return _AGENT.validate_json(frame)
    except ValidationError as exc:
        raise WireFormatError(f"bad agent frame: {_first_error(exc)}") from None


def decode_hub_message(frame: str | bytes) -> HubMessage:
    """Parse and validate a hub → agent frame; raise WireFormatError naming the problem."""
    _check_size(frame)
    try:
        return _HUB.validate_json(frame)
    except ValidationError as exc:
        raise WireFormatError(f"bad hub frame: {_first_error(exc)}") from None


def encode_message(msg: BaseModel) -> str:
    frame = msg.model_dump_json()
    _check_size(frame)
    return frame


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "frame"
    return f"{where}: {err['msg']}" + (f" ({exc.error_count()} errors)"
                                      if exc.error_count() > 1 else "")
