"""The cloud model's sketch: a skeleton prompt with length control and a parser that turns
whatever comes back into a clean, capped list of points (or nothing, which means: answer in
full instead)."""

from __future__ import annotations

import re

from pice.shared.backend import Message

_SYSTEM = (
    "You plan answers. Reply with an outline only: a numbered list of the main points that a good "
    "answer would cover, one point per line, written as a short phrase of at most {words} words. "
    "Give between 3 and {points} points. Do not explain the points, do not add an introduction or "
    "a conclusion."
)
_EXAMPLE_Q = "How can I make my mornings less rushed?"
_EXAMPLE_A = ("1. Prepare everything the night before\n2. Wake up at a fixed time\n"
              "3. Keep breakfast simple\n4. Leave a buffer for surprises")

# "1. text", "1) text", "**1.** text", "Step 1: text", "- text" (bullets only if nothing numbered)
_NUMBERED = re.compile(r"^\s*(?:\*\*)?(?:step\s+)?(\d{1,2})\s*[.):]\s*(?:\*\*)?\s*(.+?)\s*$", re.I)
_BULLET = re.compile(r"^\s*[-*•]\s+(.+?)\s*$")
_MARKUP = re.compile(r"[*_`#]+")


def sketch_messages(question: str, max_points: int, words_per_point: int,
                    history: list[Message] | None = None) -> list[Message]:
    """Chat messages asking for an outline of at most `max_points` points of `words_per_point`
    words. A one-shot example pins the format, which small models need."""
    system = _SYSTEM.format(words=words_per_point, points=max(3, max_points))
    return [
        {"role": "system", "content": system},
        *(history or []),
        {"role": "user", "content": _EXAMPLE_Q},
        {"role": "assistant", "content": _EXAMPLE_A},
        {"role": "user", "content": question},
    ]


def _clean(point: str, words_per_point: int) -> str:
    point = _MARKUP.sub("", point).strip()
    # A point that runs on ("Topic: long explanation…") keeps only its head.
    if len(point.split()) > 2 * words_per_point:
        head = re.split(r"\s*[:;—–]\s+|\s+-\s+|\.\s", point, maxsplit=1)[0]
        point = head if head else point
        words = point.split()
        if len(words) > 2 * words_per_point:
            point = " ".join(words[: 2 * words_per_point])
    return point.strip(" .,;:-")


def parse_sketch(text: str, max_points: int, words_per_point: int = 5,
                 min_points: int = 2) -> list[str]:
    """Points of an outline, in order; [] when fewer than `min_points` usable points came back.

    Numbered lines win over bullets; extra prose is ignored; duplicates (case and punctuation
    aside) are dropped; the list is capped at `max_points`."""
    lines = text.splitlines()
    found = [m.group(2) for m in map(_NUMBERED.match, lines) if m]
    if not found:
        found = [m.group(1) for m in map(_BULLET.match, lines) if m]
    points: list[str] = []
    seen: set[str] = set()
    for raw in found:
        point = _clean(raw, words_per_point)
        key = re.sub(r"\W+", " ", point).strip().lower()
        if not key or key in seen:
            continue
        seen.add(key)
        points.append(point)
        if len(points) == max_points:
            break
    return points if len(points) >= min_points else []
