"""Garbage sections, found in plain text (no model): a section that echoes the sketch ("Prioritize
tasks 2. Use productivity tools 3. Take breaks"), writes another point instead of its own,
repeats itself, or only restates its own title. `problem` names what is wrong; `salvage` keeps
what is good (the text before the echo, the first of repeated sentences) when that still makes a
section, else None (the guard then has the point rewritten, or falls back to its title).
Off-point text is measured with embeddings in selection.py (`CandidateScore.drift`)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# an item marker inside a section's prose: "… tasks 2. Use …", "… 3) Take …", "… - Next"
_ITEM = re.compile(r"(?:^|\s)(?:\d{1,2}[.)]|[-*•])\s+(?=[A-Za-z\"'(])")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE = re.compile(r"(?<=[.!?…])\s+")
_STOPWORD_TEXT = """a an the and or but of to in on at for with by from as is are was were
be been being it its this that these those your you my our their his her them they we i can
will would should could may might do does did not no so if then than too very more most also
just about into over such have has had up out"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
MIN_SECTION_WORDS = 6  # fewer words than this do not make a section
NEW_WORDS = 3  # a section must add at least this many content words beyond its title


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content(text: str) -> list[str]:
    """Words that carry meaning (stopwords dropped; plural/singular folded)."""
    return [w.rstrip("s") if len(w) > 3 else w for w in words(text) if w not in _STOPWORDS]


def _norm(text: str) -> str:
    return " ".join(words(text))


def _mentions(text: str, title: str) -> int:
    """Where `title` (normalized, at least two words or one long word) starts in `text`
    (normalized), or -1."""
    t = _norm(title)
    if not t or (" " not in t and len(t) < 6):
        return -1
    return f" {_norm(text)} ".find(f" {t} ")


def _is_other_point(text: str, point: str, others: Sequence[str]) -> bool:
    """The text is (mostly) another point's title: its content words sit inside that title's
    more than inside its own point's and the question adds little."""
    mine = set(content(text))
    if not mine or len(mine) > 8:
        return False
    own = len(mine & set(content(point)))
    return any(len(mine & set(content(o))) >= max(own + 1, 0.6 * len(mine)) for o in others)


def _repeats(text: str) -> bool:
    sentences = [_norm(s) for s in _SENTENCE.split(text) if len(words(s)) >= 3]
    if len(sentences) != len(set(sentences)):
        return True
    w = words(text)
    grams = Counter(tuple(w[i:i + 4]) for i in range(len(w) - 3))
    if grams and grams.most_common(1)[0][1] >= 3:
        return True
    return len(w) >= 16 and len(set(w)) / len(w) < 0.4


def problem(text: str, point: str, others: Sequence[str]) -> str | None:
    """What is wrong with a section body (the text after "point: "): "echo" (item markers or two
    other points inside it), "other point", "repeats", "restates" (nothing beyond its title), or
    None. `others`: the sketch's other points."""
    if not text.strip():
        return None  # empty: the guard's own verdict
    if _ITEM.search(text) or sum(_mentions(text, o) >= 0 for o in others) >= 2:
        return "echo"
    if _is_other_point(text, point, others) or any(_mentions(text, o) == 0 for o in others):
        return "other point"  # another point's title, or its text under that title
    if _repeats(text):
        return "repeats"
    if len(set(content(text)) - set(content(point))) < NEW_WORDS:
        return "restates"
    return None


def _cut(text: str, others: Sequence[str]) -> str:
    """The text before the first item marker or mention of another point."""
    cuts = [m.start() for m in [_ITEM.search(text)] if m is not None]
    low = text.lower()
    for o in others:
        if _mentions(text, o) >= 0:
            first = words(o)[0]
            at = [m.start() for m in re.finditer(rf"\b{re.escape(first)}\b", low)
                  if _norm(text[m.start():]).startswith(_norm(o))]
            cuts += at[:1]
    return text[:min(cuts)] if cuts else text


def _dedupe(text: str) -> str:
    """Each sentence once, in order; a sentence whose 4-gram was already seen twice ends it."""
    kept: list[str] = []
    seen: set[str] = set()
    for s in _SENTENCE.split(text):
        key = _norm(s)
        if key in seen:
            continue
        seen.add(key)
        kept.append(s)
    return " ".join(kept)


def _whole_sentences(text: str) -> str:
    m = re.match(r"""^(.*[.!?…]["')\]]*)(?:\s|$)""", text, re.S)
    return m.group(1).strip() if m else ""


def salvage(text: str, point: str, others: Sequence[str]) -> str | None:
    """The good part of a garbage section, ending at a full sentence, or None when too little is
    left (fewer than MIN_SECTION_WORDS words) or what is left is still garbage."""
    kept = _whole_sentences(_dedupe(_cut(text, others)).strip())
    if len(words(kept)) < MIN_SECTION_WORDS or problem(kept, point, others) is not None:
        return None
    return kept


def _shingles(sentence: str) -> set[tuple[str, ...]]:
    w = words(sentence)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def same_sentence(a: str, b: str) -> bool:
    """The same sentence said twice, in two sections: equal once normalized, or (four words and
    more) most of the shorter one's word triples inside the other's."""
    if _norm(a) == _norm(b):
        return bool(_norm(a))
    sa, sb = _shingles(a), _shingles(b)
    if min(len(sa), len(sb)) < 2:
        return False
    return len(sa & sb) / min(len(sa), len(sb)) >= 0.6


def drop_said(text: str, said: Sequence[str]) -> tuple[str, int]:
    """(the text without its sentences that another section already said, how many went).
    `said`: the other sections' bodies."""
    before = [s for t in said for s in _SENTENCE.split(t) if len(words(s)) >= 3]
    kept, dropped = [], 0
    for s in _SENTENCE.split(text):
        if len(words(s)) >= 3 and any(same_sentence(s, b) for b in before):
            dropped += 1
            continue
        kept.append(s)
    return " ".join(kept).strip(), dropped
