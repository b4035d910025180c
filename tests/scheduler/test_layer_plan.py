"""The edge-group layer planner on mixed devices: table-driven cases, plus properties that every
plan has (contiguous, complete, within memory, ends holding the embedding and the head)."""

from __future__ import annotations

import random

import pytest

from pice.scheduler.layer_plan import (
    LayerPlan,
    Member,
    MiB,
    ModelShape,
    PlanConfig,
    plan_layers,
    shape_from_config,
)

# 12 layers of 100 MiB, a 200 MiB embedding and head; a layer costs 1 unit, the head 2 units
SHAPE = ModelShape(num_layers=12, layer_bytes=100 * MiB, embed_bytes=200 * MiB,
                   head_bytes=200 * MiB, kv_bytes_per_token=1024, layer_flops=1.0,
                   head_flops=2.0)
CFG = PlanConfig(kv_tokens=1024, reserve_bytes=0, headroom=1.0)  # KV: 1 MiB per layer
GiB = 1024 * MiB


def m(name: str, gib: float, speed: float = 1.0) -> Member:
    return Member(name, int(gib * GiB), speed)


def ranges(plan: LayerPlan) -> list[tuple[str, int, int]]:
    return [(s.member_id, s.start, s.end) for s in plan.stages]


CASES = [
    # (name, members, expected ranges in pipeline order, members left out with a reason word)
    ("one member holds it all", [m("a", 4.0)], [("a", 0, 12)], {}),
    ("two equal: the head's stage gets fewer layers",
     [m("a", 4.0), m("b", 4.0)], [("a", 0, 7), ("b", 7, 12)], {}),
    ("twice as fast holds about twice the layers",
     [m("slow", 4.0, 1.0), m("fast", 4.0, 2.0)], [("fast", 0, 9), ("slow", 9, 12)], {}),
    ("too small for any layer gets none", [m("a", 4.0), m("b", 4.0), m("pi", 0.05)],
     [("a", 0, 7), ("b", 7, 12)], {"pi": "too small"}),
    # fast holds 4 layers either way; as the last stage it also takes the head's compute
    ("memory caps a fast member", [m("fast", 0.6, 10.0), m("big", 4.0, 1.0)],
     [("big", 0, 8), ("fast", 8, 12)], {}),
    ("a far slower member is not needed", [m("a", 4.0), m("b", 4.0), m("snail", 4.0, 0.01)],
     [("a", 0, 7), ("b", 7, 12)], {"snail": "not needed"}),
    ("four weak devices that cannot hold it alone",
     [m(f"n{i}", 0.6) for i in range(4)],
     [("n0", 0, 3), ("n1", 3, 6), ("n2", 6, 10), ("n3", 10, 12)], {}),  # head: 2 layers' worth
    ("no speed measured", [m("a", 4.0), Member("b", 4 * GiB, 0.0)], [("a", 0, 12)],
     {"b": "no measured speed"}),
]


@pytest.mark.parametrize(("name", "members", "expected", "left_out"), CASES,
                         ids=[c[0] for c in CASES])
def test_plans(name: str, members: list[Member], expected: list[tuple[str, int, int]],
               left_out: dict[str, str]) -> None:
    plan = plan_layers(SHAPE, members, CFG)
    assert plan.ok, plan.problem
    assert ranges(plan) == expected, plan.describe()
    reasons = dict(plan.unused)
    assert set(reasons) == set(left_out)
    for member, word in left_out.items():
        assert word in reasons[member]
    check_plan(plan, members)


def test_members_that_cannot_hold_the_model_get_a_reason() -> None:
    plan = plan_layers(SHAPE, [m("a", 0.5), m("b", 0.5), m("tiny", 0.01)], CFG)
    assert not plan.ok and plan.stages == ()
    assert plan.problem is not None and "of 12 layers" in plan.problem
    assert "too small" in dict(plan.unused)["tiny"]


def test_tied_head_is_a_second_copy_unless_one_stage_holds_both() -> None:
    tied = ModelShape(**{**SHAPE.__dict__, "tied": True})
    # 1.4 GiB holds 12 layers (1212 MiB) + the embedding (200) once, not twice
    assert ranges(plan_layers(tied, [m("a", 1.4)], CFG)) == [("a", 0, 12)]
    assert not plan_layers(SHAPE, [m("a", 1.4)], CFG).ok


def test_bottleneck_is_the_slowest_stage() -> None:
    plan = plan_layers(SHAPE, [m("a", 4.0), m("b", 4.0)], CFG)
    assert plan.bottleneck_s == pytest.approx(7.0)  # a: 7 layers; b: 5 layers + head (2)


def check_plan(plan: LayerPlan, members: list[Member]) -> None:
    free = {x.member_id: x.free_bytes for x in members}
    assert plan.stages[0].start == 0 and plan.stages[-1].end == SHAPE.num_layers
    for prev, nxt in zip(plan.stages, plan.stages[1:], strict=False):
        assert prev.end == nxt.start
    assert all(s.layers >= 1 and s.bytes <= free[s.member_id] for s in plan.stages)
    assert plan.stages[0].embed and plan.stages[-1].head
    assert sum(s.embed for s in plan.stages) == 1 and sum(s.head for s in plan.stages) == 1
    used = {s.member_id for s in plan.stages} | {u for u, _ in plan.unused}
    assert used == set(free)


def test_random_mixed_fleets_give_valid_plans() -> None:
    rng = random.Random(0)
    for _ in range(200):
        members = [m(f"d{i}", rng.choice([0.05, 0.3, 0.6, 1.0, 2.0, 8.0]),
                     rng.choice([0.25, 0.5, 1.0, 3.0])) for i in range(rng.randint(1, 6))]
        plan = plan_layers(SHAPE, members, CFG)
        if plan.ok:
            check_plan(plan, members)
            # no single member alone does better than the plan's bottleneck
            for x in members:
                solo = plan_layers(SHAPE, [x], CFG)
                assert not solo.ok or solo.bottleneck_s >= plan.bottleneck_s - 1e-9
        else:
            assert plan.problem


def test_shape_from_a_qwen_config() -> None:
    cfg = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
           "num_key_value_heads": 2, "vocab_size": 151936, "num_hidden_layers": 24,
           "tie_word_embeddings": True, "model_type": "qwen2"}
    s = shape_from_config(cfg, dtype_bytes=4)
    assert s.tied and s.num_layers == 24
    total = s.embed_bytes + s.num_layers * s.layer_bytes
    assert 490e6 < total / 4 < 500e6  # Qwen2.5-0.5B: 494M parameters
    assert s.kv_bytes_per_token == 2 * 2 * 64 * 4


def test_a_replan_keeps_the_first_stage_when_asked() -> None:
    members = [m("a", 4.0), m("b", 4.0, 2.0)]
    assert plan_layers(SHAPE, members, CFG).stages[0].member_id == "b"
    kept = plan_layers(SHAPE, members, CFG, first="a")
    assert kept.stages[0].member_id == "a" and kept.stages[0].embed
    gone = plan_layers(SHAPE, members, CFG, first="dead")  # not a member: no constraint
    assert gone.stages[0].member_id == "b"
