"""Layer planning for an edge group: one model split into contiguous layer ranges, one range per
member, from each member's reported free memory and measured speed. Pure: no I/O, no torch.

Every stage holds its layers' weights plus their KV cache for `kv_tokens` tokens; the first stage
also holds the token embedding, the last the final norm and LM head (a tied head is a second copy
of the embedding unless one stage holds both). A stage's time per token is its layers' FLOPs (plus
the head's on the last stage) over its measured FLOP/s. With at least as many sequences in flight
as stages the pipeline runs at the pace of its slowest stage, so the plan minimises the largest
stage time (the bottleneck) subject to memory: exact over the candidate bottleneck values, for
every choice of first and last member (middle members fastest first).

A member whose memory cannot hold a single layer (with its KV) gets no range, and the plan says
why; so does one the others do not need."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 2**20


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    layer_bytes: int  # weights of one decoder layer
    embed_bytes: int  # token embedding (first stage)
    head_bytes: int  # final norm + LM head (last stage)
    kv_bytes_per_token: int  # K and V of one token in ONE layer
    layer_flops: float  # per token through one decoder layer
    head_flops: float  # per token through the final norm + LM head
    tied: bool = False  # the LM head is the embedding matrix


def shape_from_config(cfg: Mapping[str, Any], dtype_bytes: int = 4) -> ModelShape:
    """A model's shape from its HF config.json (Llama, Qwen2, Gemma 3 text)."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    hd = int(cfg.get("head_dim") or h // heads)
    vocab, layers = int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])
    tied = bool(cfg.get("tie_word_embeddings", cfg.get("model_type") == "gemma3_text"))
    attn = h * (heads + 2 * kv_heads) * hd + heads * hd * h + (heads + 2 * kv_heads) * hd
    layer_params = attn + 3 * h * inter + 4 * h + 2 * hd  # + norms (q/k norms for Gemma)
    return ModelShape(
        num_layers=layers, layer_bytes=layer_params * dtype_bytes,
        embed_bytes=vocab * h * dtype_bytes, head_bytes=(vocab * h + h) * dtype_bytes,
        kv_bytes_per_token=2 * kv_heads * hd * dtype_bytes,
        layer_flops=2.0 * layer_params, head_flops=2.0 * vocab * h, tied=tied)


@dataclass(frozen=True)
class Member:
    member_id: str
    free_bytes: int  # memory it can give the model now
    flops_per_s: float  # measured (a short fp32 matmul at start)


@dataclass(frozen=True)
class PlanConfig:
    kv_tokens: int = 4096  # KV cache each stage holds: tokens in flight across all sequences
    reserve_bytes: int = 256 * MiB  # runtime (interpreter, torch, buffers) per member
    headroom: float = 0.9  # share of the reported free memory the plan may use
    hop_s: float = 0.0  # per-stage cost of passing one micro-batch on (link latency)


@dataclass(frozen=True)
class Stage:
    member_id: str
    start: int  # first layer (inclusive)
    end: int  # last layer (exclusive)
    embed: bool  # holds the token embedding (first stage)
    head: bool  # holds the final norm + LM head (last stage)
    bytes: int  # planned memory: weights + KV + reserve
    seconds_per_token: float  # planned compute time per token (plus hop_s)

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LayerPlan:
    stages: tuple[Stage, ...]  # in pipeline order; empty when the members cannot hold the model
    unused: tuple[tuple[str, str], ...]  # (member id, why it holds no range)
    problem: str | None = None  # why there is no plan

    @property
    def ok(self) -> bool:
        return bool(self.stages)

    @property
    def bottleneck_s(self) -> float:
        return max((s.seconds_per_token for s in self.stages), default=0.0)

    def describe(self) -> str:
        parts = [f"{s.member_id}[{s.start}:{s.end})" for s in self.stages]
        return " -> ".join(parts) if parts else f"no plan: {self.problem}"


def _usable(m: Member, cfg: PlanConfig) -> int:
    return int(m.free_bytes * cfg.headroom) - cfg.reserve_bytes


class _Order:
    """One candidate pipeline order; caps per stage for a bottleneck value."""

    def __init__(self, members: list[Member], shape: ModelShape, cfg: PlanConfig) -> None:
        self.members, self.shape, self.cfg = members, shape, cfg
        self.per_layer = shape.layer_bytes + shape.kv_bytes_per_token * cfg.kv_tokens
        n = len(members)
        self.fixed_bytes = [self._fixed_bytes(i == 0, i == n - 1) for i in range(n)]
        self.fixed_s = [cfg.hop_s + (shape.head_flops / m.flops_per_s if i == n - 1 else 0.0)
                        for i, m in enumerate(members)]
        # layers each member's memory holds besides its fixed part (-1: not even that)
        self.mem_caps = [(_usable(m, cfg) - fb) // self.per_layer if _usable(m, cfg) >= fb
                         else -1 for m, fb in zip(members, self.fixed_bytes, strict=True)]

    def _fixed_bytes(self, first: bool, last: bool) -> int:
        s = self.shape
        embed = s.embed_bytes if first else 0
        head = s.head_bytes if last else 0
        if first and last and s.tied:
            head -= s.embed_bytes  # one stage: the head shares the embedding
        return embed + head

    def stage_time(self, i: int, layers: int) -> float:
        return self.fixed_s[i] + layers * self.shape.layer_flops / self.members[i].flops_per_s

    def caps(self, t: float) -> list[int] | None:
        out = []
        for i, m in enumerate(self.members):
            if self.mem_caps[i] < 0:
                return None
            slack = t - self.fixed_s[i]
            if slack < 0:
                return None
            by_time = int(slack * m.flops_per_s / self.shape.layer_flops + 1e-9)
            out.append(min(self.mem_caps[i], by_time))
        ends = {0, len(out) - 1}
        if any(out[i] < 1 for i in ends) or sum(out) < self.shape.num_layers:
            return None
        return out

    def candidates(self) -> list[float]:
        times = {self.stage_time(i, k) for i in range(len(self.members))
                 for k in range(1, self.shape.num_layers + 1)}
        return sorted(times)

    def best(self) -> tuple[float, list[int]] | None:
        """The smallest feasible bottleneck and a layer count per stage achieving it."""
        ts = self.candidates()
        if not ts or self.caps(ts[-1]) is None:
            return None
        lo = bisect.bisect_left(range(len(ts)), True, key=lambda j: self.caps(ts[j]) is not None)
        t = ts[lo]
        counts = self.caps(t)
        assert counts is not None
        excess = sum(counts) - self.shape.num_layers
        while excess > 0:  # trim the slowest stage first (never the ends below one layer)
            order = sorted(range(len(counts)), key=lambda i: -self.stage_time(i, counts[i]))
            i = next(i for i in order if counts[i] > (1 if i in (0, len(counts) - 1) else 0))
            counts[i] -= 1
            excess -= 1
        return max(self.stage_time(i, c) for i, c in enumerate(counts) if c), counts


_Best = tuple[float, int, list[int], list[Member], list[int]]


def _search(heads: list[Member], fastest: list[Member], rank: dict[int, int],
            shape: ModelShape, cfg: PlanConfig) -> _Best | None:
    """The best (bottleneck, stages used, order key, order, layers per stage) over every choice
    of first member in `heads` and last member in `fastest`."""
    best: _Best | None = None
    for a in heads:
        for b in fastest:
            order = [a] if a is b else [a, *[m for m in fastest if m not in (a, b)], b]
            found = _Order(order, shape, cfg).best()
            if found is None:
                continue
            t, counts = found
            key = (t, sum(1 for c in counts if c), [rank[id(m)] for m in order])
            if best is None or key < (best[0], best[1], best[2]):
                best = (*key, order, counts)
    return best


def plan_layers(shape: ModelShape, members: Sequence[Member],
                cfg: PlanConfig | None = None, first: str | None = None) -> LayerPlan:
    """Contiguous layer ranges over `members` (see the module doc). `first`: the member that
    must be the first stage when it can be (a re-plan keeps the stage that holds the requests)."""
    cfg = cfg or PlanConfig()
    per_layer = shape.layer_bytes + shape.kv_bytes_per_token * cfg.kv_tokens
    unused: list[tuple[str, str]] = []
    eligible: list[Member] = []
    for m in members:
        if m.flops_per_s <= 0:
            unused.append((m.member_id, "no measured speed"))
        elif _usable(m, cfg) < per_layer:
            unused.append((m.member_id, f"too small: {m.free_bytes / MiB:.0f} MiB free holds no "
                           f"layer (one layer with its KV for {cfg.kv_tokens} tokens needs "
                           f"{(per_layer + cfg.reserve_bytes) / cfg.headroom / MiB:.0f} MiB)"))
        else:
            eligible.append(m)
    if not eligible:
        return LayerPlan((), tuple(unused), "no member can hold a layer")
    # fastest first; equal speeds keep the order the members were given (registration order)
    fastest = sorted(eligible, key=lambda m: -m.flops_per_s)
    rank = {id(m): i for i, m in enumerate(fastest)}
    best = _search([m for m in fastest if m.member_id == first] or fastest, fastest, rank,
                   shape, cfg)
    if best is None and first is not None:  # it cannot be first: any order will do
        best = _search(fastest, fastest, rank, shape, cfg)
    if best is None:
        held = max(sum(max(0, c) for c in _Order(o, shape, cfg).mem_caps)
                   for o in ([fastest[0]], fastest))
        return LayerPlan((), tuple(unused), f"members hold at most {held} of {shape.num_layers} "
                         "layers (with the embedding, LM head and KV cache)")
    _, _, _, order, counts = best
    o = _Order(order, shape, cfg)
    stages, start = [], 0
    for i, (m, c) in enumerate(zip(order, counts, strict=True)):
        if c == 0:
            unused.append((m.member_id, "not needed: the others hold every layer at a lower "
                           "bottleneck"))
            continue
        last = i == len(order) - 1
        stages.append(Stage(m.member_id, start, start + c, embed=i == 0, head=last,
                            bytes=o.fixed_bytes[i] + c * o.per_layer + cfg.reserve_bytes,
                            seconds_per_token=o.stage_time(i, c)))
        start += c
    return LayerPlan(tuple(stages), tuple(unused))
