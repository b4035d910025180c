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
    ("1. First\n- ignored bullet\n2. Second", 6, ["First", "Second"]),  # the first style wins
    ("Sure:\n1. Prioritize tasks 2. Use productivity tools 3. Take breaks", 6,
     ["Prioritize tasks", "Use productivity tools", "Take breaks"]),  # run together on one line
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


def test_stream_yields_each_point_when_its_line_completes() -> None:
    from pice.cloud.sketcher import SketchStream

    text = "Here is an outline:\n1. Keep a fixed schedule\n2. Dark, quiet room\n3. No screens late"
    stream = SketchStream(max_points=6)
    got = [(i, stream.feed(ch)) for i, ch in enumerate(text)]
    firsts = [(i, pts) for i, pts in got if pts]
    # a point comes out at the newline that ends its line, not before
    assert [text[i] for i, _ in firsts] == ["\n", "\n"]
    assert [pts for _, pts in firsts] == [["Keep a fixed schedule"], ["Dark, quiet room"]]
    assert stream.close() == ["Keep a fixed schedule", "Dark, quiet room", "No screens late"]
    capped = SketchStream(max_points=2)
    capped.feed("1. a b\n2. c d\n3. e f\n")
    assert capped.full and capped.close() == ["a b", "c d"]
    assert SketchStream(max_points=6).close() == []


@pytest.mark.parametrize(("text", "expected"), [
    # captured from the packaged 1.5B (comparison-03 and -05 of the quality bench, 2026-12-02):
    # these sketches fell back to a full cloud answer before labeled lines were parsed
    ("Advantages: Flexibility, reduced commute, better work-life balance\n"
     "Disadvantages: Limited social interaction, potential isolation, lack of physical presence",
     ["Flexibility (advantage)", "Reduced commute (advantage)",
      "Better work-life balance (advantage)", "Limited social interaction (disadvantage)",
      "Potential isolation (disadvantage)"]),
    ("Pros: Portability, cost-effectiveness, accessibility\n"
     "Cons: Limited physical interaction, may lack certain features",
     ["Portability (pro)", "Cost-effectiveness (pro)", "Accessibility (pro)",
      "Limited physical interaction (con)", "May lack certain features (con)"]),
    ("**Benefits:** speed, safety and cost\n**Drawbacks:** noise", ["Speed (benefit)",
     "Safety (benefit)", "Cost (benefit)"]),  # one item is no list: that line is skipped
    # a sentence after a colon, and a heading before a numbered list, are not labeled items
    ("Pros: Renting can be cheaper, saving money on property taxes and insurance. Cons: Renting "
     "can be less convenient, as you have to pay rent.", []),
    ("Here are the points: first, second\n1. Real point one\n2. Real point two",
     ["Real point one", "Real point two"]),  # a four-word preamble is no label
    ("1. Cost: cheap, fast\n2. Safety", ["Cost: cheap, fast", "Safety"]),  # numbered wins
])
def test_parse_sketch_labeled_lines(text: str, expected: list[str]) -> None:
    assert parse_sketch(text, max_points=5, words_per_point=5) == expected
