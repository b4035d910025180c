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
_INLINE_ITEM = re.compile(r"\s+\d{1,2}[.)]\s+(?=[A-Z])")
# "Advantages: flexibility, no commute, better balance": a comparison's sketch as labeled lines
# (the 1.5B wrote 2 of 5 comparison sketches so, 2026-12-02); each item becomes a point
_LABELED = re.compile(r"^\s*(?:\*\*)?([A-Za-z][\w' -]{0,30}?)(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.+?)\s*$")
_LABEL_WORDS = 3  # a label is a heading ("Pros", "Working remotely"), not a sentence


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


def _singular(label: str) -> str:
    """"Advantages" → "advantage", "Cons" → "con"; other labels ("renting") as they are."""
    word = label.strip().lower()
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _labeled_items(line: str, words_per_point: int) -> list[str]:
    """"Label: a, b, c" → ["a (label)", "b (label)", "c (label)"]; [] unless the line is a short
    label over two or more short comma-separated items (a sentence after a colon is no list)."""
    m = _LABELED.match(line)
    if m is None or len(m.group(1).split()) > _LABEL_WORDS:
        return []
    parts = [p.strip(" .") for p in re.split(r"[,;]", m.group(2))]
    parts = [re.sub(r"^(?:and|or)\s+", "", p) for p in parts if p]
    if len(parts) >= 2 and " and " in parts[-1]:  # "a, b and c"
        parts[-1:] = parts[-1].split(" and ", 1)
    if len(parts) < 2 or any(len(p.split()) > 2 * words_per_point or re.search(r"[.!?]\s", p)
                             for p in parts):
        return []
    label = _singular(_MARKUP.sub("", m.group(1)))
    return [f"{p[0].upper()}{p[1:]} ({label})" for p in parts]


def _split_inline(item: str) -> list[str]:
    """"Prioritize tasks 2. Use tools 3. Take breaks" (several items on one line) → the items."""
    return [p for p in _INLINE_ITEM.split(item) if p.strip()]


def parse_sketch(text: str, max_points: int, words_per_point: int = 5,
                 min_points: int = 2) -> list[str]:
    """Points of an outline, in order; [] when fewer than `min_points` usable points came back.

    The first item's style (numbered, bullets, or labeled lines of comma-separated items:
    "Pros: a, b" → "A (pro)", "B (pro)") wins; extra prose is ignored; several items
    run together on one line are split; duplicates (case and punctuation aside) are dropped; the
    list is capped at `max_points`."""
    stream = SketchStream(max_points, words_per_point, min_points)
    stream.feed(text)
    return stream.close()


class SketchStream:
    """The sketch parsed as it streams: `feed` text deltas and get the points whose lines just
    completed; `close` parses the last line and returns every point ([] when too few).

    The first item line fixes the style (numbered lines or bullets); lines of the other style
    are ignored, so a point once given is never taken back."""

    def __init__(self, max_points: int, words_per_point: int = 5, min_points: int = 2) -> None:
        self.max_points = max_points
        self.words_per_point = words_per_point
        self.min_points = min_points
        self.points: list[str] = []
        self._buffer = ""
        self._style: str | None = None  # "numbered" | "bullets" | "labeled": the first item's
        self._seen: set[str] = set()

    @property
    def full(self) -> bool:
        return len(self.points) >= self.max_points

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        *lines, self._buffer = self._buffer.split("\n")
        return [p for line in lines for p in self._line(line)]

    def close(self) -> list[str]:
        if self._buffer:
            self._line(self._buffer)
            self._buffer = ""
        return self.points if len(self.points) >= self.min_points else []

    def _line(self, line: str) -> list[str]:
        m = _NUMBERED.match(line)
        b = _BULLET.match(line) if m is None else None
        labeled = (_labeled_items(line, self.words_per_point)
                   if m is None and b is None and self._style in (None, "labeled") else [])
        if m is not None and self._style in (None, "numbered"):
            self._style = "numbered"
            items = _split_inline(m.group(2))
        elif b is not None and self._style in (None, "bullets"):
            self._style = "bullets"
            items = [b.group(1)]
        elif labeled:
            self._style = "labeled"
            items = labeled
        else:
            return []
        new: list[str] = []
        for raw in items:
            point = _clean(raw, self.words_per_point)
            key = re.sub(r"\W+", " ", point).strip().lower()
            if not key or key in self._seen or self.full:
                continue
            self._seen.add(key)
            self.points.append(point)
            new.append(point)
        return new
