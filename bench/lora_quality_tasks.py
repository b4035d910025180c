"""The small tasks of `pice bench lora --compressed --quality`: each a distinct dataset built from
the shipped question set (bench/questions.jsonl): the question in, a short answer out, in one of
24 styles (topic labels in several formats and vocabularies, extraction, counting, re-spelling,
word order). Prompts never name the task, so only the adapter knows it. Answers are capped at
`MAX_ANSWER` tokens so a training step stays short."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_ANSWER = 8  # answer tokens kept (EOS included when it fits)
_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "teal", "pink", "gold",
            "white", "black"]
_GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
          "kappa", "lambda"]
_FRENCH = {"generic": "général", "knowledge": "savoir", "common-sense": "bon sens",
           "counterfactual": "contrefactuel", "roleplay": "jeu de rôle",
           "stem-explain": "science", "comparison": "comparaison", "math": "maths",
           "coding": "programmation", "fermi": "estimation", "creative-writing": "écriture"}

Example = tuple[str, str]  # (question, category)
Task = tuple[str, Callable[[str, str, list[str]], str]]  # name, answer(question, topic, topics)


def _words(q: str) -> list[str]:
    return q.rstrip("?.!").replace(",", "").split()


def tasks() -> list[Task]:
    """24 tasks (name, answer function)."""
    w = _words
    return [
        ("topic", lambda q, c, cs: c),
        ("topic-upper", lambda q, c, cs: c.upper()),
        ("topic-json", lambda q, c, cs: json.dumps({"topic": c})),
        ("topic-number", lambda q, c, cs: f"#{cs.index(c)}"),
        ("topic-colour", lambda q, c, cs: _COLOURS[cs.index(c) % len(_COLOURS)]),
        ("topic-greek", lambda q, c, cs: _GREEK[(cs.index(c) * 7) % len(_GREEK)]),
        ("topic-french", lambda q, c, cs: _FRENCH.get(c, c)),
        ("first-2-words", lambda q, c, cs: " ".join(w(q)[:2])),
        ("last-2-words", lambda q, c, cs: " ".join(w(q)[-2:])),
        ("first-word-upper", lambda q, c, cs: w(q)[0].upper()),
        ("last-word-upper", lambda q, c, cs: w(q)[-1].upper()),
        ("third-word", lambda q, c, cs: (w(q) + ["-"] * 3)[2]),
        ("acronym", lambda q, c, cs: "".join(x[0] for x in w(q)).upper()[:8]),
        ("count", lambda q, c, cs: f"{len(w(q))} words"),
        ("count-spelled", lambda q, c, cs: _NUM[len(w(q)) % 10]),
        ("longest", lambda q, c, cs: max(w(q), key=len)),
        ("shortest", lambda q, c, cs: min(w(q), key=len)),
        ("even-odd", lambda q, c, cs: "even" if len(w(q)) % 2 == 0 else "odd"),
        ("dashed", lambda q, c, cs: "-".join(w(q)[:3]).lower()),
        ("reverse-3", lambda q, c, cs: " ".join(reversed(w(q)[:3]))),
        ("sorted-3", lambda q, c, cs: " ".join(sorted(x.lower() for x in w(q)[:3]))),
        ("caesar-1", lambda q, c, cs: "".join(chr((ord(x) - 96) % 26 + 97) if x.islower()
                                              else x for x in w(q)[0].lower())),
        ("lengths-4", lambda q, c, cs: " ".join(str(len(x)) for x in w(q)[:4])),
        ("question-mark", lambda q, c, cs: "question" if q.rstrip().endswith("?")
         else "request"),
    ]


def examples(path: Path | None = None) -> list[Example]:
    path = path or Path(__file__).parent / "questions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["question"], r["category"]) for r in rows]


def split(n: int, every: int = 5) -> tuple[list[int], list[int]]:
    """Train / held-out indices: every `every`-th example held out (the file is ordered by
    category, so each category is on both sides)."""
    held = [i for i in range(n) if i % every == every - 1]
    return [i for i in range(n) if i % every != every - 1], held


def encode(tok: Any, exs: list[Example], task: Task) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids per example, answer ids per example); prompts are the same for every task."""
    cats = sorted({c for _, c in exs})
    prompts = [tok(f"Input: {q}\nOutput:", add_special_tokens=False)["input_ids"]
               for q, _ in exs]
    answers = []
    for q, c in exs:
        ids = tok(" " + task[1](q, c, cats), add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        answers.append((ids + eos)[:MAX_ANSWER])
    return prompts, answers
