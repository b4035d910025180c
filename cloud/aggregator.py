"""Assemble expanded points into the final answer, in sketch order."""

from __future__ import annotations

from pice.shared.protocol import ExpansionResult


def aggregate(sketch: list[str], results: list[ExpansionResult]) -> str:
    """results: one per point, any order."""
    by_index = {r.index: r for r in results}
    missing = [i for i in range(len(sketch)) if i not in by_index]
    assert not missing, f"points without an expansion: {missing}"
    return "\n".join(f"{i + 1}. {by_index[i].text}" for i in range(len(sketch)))
