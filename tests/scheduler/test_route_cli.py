"""`pice route` as a user runs it: a subprocess, arguments or stdin, text or JSON lines."""

import json
import subprocess
import sys

import pytest


def route(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pice.cli", "route", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_json_lines_from_stdin() -> None:
    out = route("--json", stdin="How can I make friends in a new city?\n\n"
                                "Write a limerick about a goat.\n")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["question"] for r in rows] == ["How can I make friends in a new city?",
                                            "Write a limerick about a goat."]
    assert rows[0]["mode"] == "progressive" and rows[0]["probability"] > 0.5
    assert rows[0]["placement"] == ["edge-0"] * rows[0]["points"]
    assert rows[1]["mode"] == "cloud" and rows[1]["code"] == "unsuited"
    assert all(r["reason"] for r in rows)
    assert "torch_dtype" not in out.stderr and "qwen" not in out.stderr.lower()  # no LLM


@pytest.mark.parametrize(("args", "needle"), [
    (("--edges", "0", "What are good habits for studying?"), "no edge worker available"),
    (("--policy", "always-cloud", "What are good habits for studying?"), "always-cloud"),
])
def test_text_output_from_arguments(args: tuple[str, ...], needle: str) -> None:
    out = route(*args)
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    assert needle in line and line.endswith("| What are good habits for studying?")


def test_bad_flag_value_is_refused() -> None:
    out = route("--edges", "-1", "hi")
    assert out.returncode == 2
    assert "--edges must be >= 0" in out.stderr
