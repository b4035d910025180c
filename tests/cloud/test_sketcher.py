import pytest

from pice.cloud.sketcher import parse_sketch, sketch_messages


@pytest.mark.parametrize(("text", "max_points", "expected"), [
    ("1. Fixed schedule\n2. Dark room\n3. No screens", 6,
     ["Fixed schedule", "Dark room", "No screens"]),
    ("Sure! Here is an outline:\n1) Fixed schedule\n2) Dark room\nHope this helps.", 6,
     ["Fixed schedule", "Dark room"]),
    ("**1.** **Fixed schedule**\n**2.** Dark room", 6, ["Fixed schedule", "Dark room"]),
    ("1. Dark room\n2. dark room.\n3. Exercise", 6, ["Dark room", "Exercise"]),  # duplicate
    ("1. a\n2. b\n3. c\n4. d\n5. e", 3, ["a", "b", "c"]),  # capped
    ("- Fixed schedule\n- Dark room", 6, ["Fixed schedule", "Dark room"]),  # bullets
    ("1. First\n- ignored bullet\n2. Second", 6, ["First", "Second"]),  # numbered wins
    ("Step 1: Plan ahead\nStep 2: Sleep early", 6, ["Plan ahead", "Sleep early"]),
    ("1. Caffeine: avoid coffee after noon because it stays in your blood for many hours "
     "and keeps you awake\n2. Light", 6, ["Caffeine", "Light"]),  # run-on point keeps its head
    ("Just go to bed earlier and relax.", 6, []),  # no list → fallback
    ("1. Only one point", 6, []),  # below min_points → fallback
    ("", 6, []),
])
def test_parse_sketch(text: str, max_points: int, expected: list[str]) -> None:
    assert parse_sketch(text, max_points, words_per_point=5) == expected


def test_sketch_prompt_carries_length_control() -> None:
    msgs = sketch_messages("Why is the sky blue?", max_points=7, words_per_point=4)
    assert msgs[0]["role"] == "system"
    assert "at most 4 words" in msgs[0]["content"]
    assert "between 3 and 7 points" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": "Why is the sky blue?"}
