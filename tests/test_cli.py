"""The command line as a user runs it (subprocesses): `pice models`, and `pice ask` against a
running server (the default), with none, with one still loading, and in-process (--local)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from pice.cloud.api.app import create_app
from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port


def _ask(*args: str, port: int | None = None, timeout: float = 300,
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"PICE_PORT": str(port)} if port is not None else {})}
    return subprocess.run([sys.executable, "-m", "pice", "ask", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_models_list_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pice", "models", "list", "--cache-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for alias in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        assert alias in out.stdout


def test_ask_prints_sketch_then_sections(sketch_model_dir: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pice", "ask", SKETCH_QUESTIONS[0], "--local", "--mode",
         "progressive", "--max-tokens", "60", "--cloud-model", str(sketch_model_dir),
         "--edge-model", str(sketch_model_dir), "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    sketch, answer = text.split("Answer:\n")
    assert sketch.startswith("Sketch:\n  1. Fixed sleep schedule\n")
    assert "  3. No screens late\n" in sketch
    sections = [line for line in answer.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    # each section once, under its own title (a junk expansion of the tiny model is cut back
    # to the title by the guard, so only the title is certain)
    assert sorted(line[:3] for line in sections) == ["1. ", "2. ", "3. "]
    assert any(line.startswith("1. Fixed sleep schedule") for line in sections)
    assert "[progressive: requested;" in text


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pice", "ask", "hi", "--local",
                          "--cloud-model", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "nope" in out.stderr and "Traceback" not in out.stderr


def test_ask_uses_the_running_server(server: LiveServer) -> None:
    """No --url: the configured address (PICE_PORT); the answer streams from the server."""
    out = _ask(SKETCH_QUESTIONS[0], "--mode", "progressive", "--max-tokens", "60",
               port=int(server.url.rsplit(":", 1)[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Sketch:\n  1. Fixed sleep schedule\n"), out.stdout
    assert "Answer:\n" in out.stdout and "[progressive: requested;" in out.stdout
    assert "Loading" not in out.stderr  # no model was loaded in the client
    assert "HTTP Request" not in out.stderr  # no log line per HTTP call


def test_ask_with_no_server_says_how_to_start_one() -> None:
    port = _free_port()  # nothing listens there
    out = _ask("hi", port=port, timeout=60)
    assert out.returncode == 1
    assert f"no pice server at http://127.0.0.1:{port}" in out.stderr
    assert "make serve" in out.stderr and "--local" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_ask_refuses_model_flags_without_local(tmp_path: Path) -> None:
    out = _ask("hi", "--cloud-model", str(tmp_path), port=_free_port(), timeout=60)
    assert out.returncode == 2 and "--cloud-model" in out.stderr and "--local" in out.stderr


@pytest.fixture
def loading_server() -> Iterator[str]:
    """A server whose models never finish loading (the builder waits for the test to end)."""
    release = threading.Event()

    def builder(settings: ServeSettings, metrics: object) -> object:
        release.wait(300)
        raise RuntimeError("test over")

    port = _free_port()
    app = create_app(ServeSettings(port=port), builder)  # type: ignore[arg-type]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started and thread.is_alive():
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{port}"
    release.set()
    srv.should_exit = True
    thread.join(timeout=30)


def test_ask_waits_a_bounded_time_for_a_loading_server(loading_server: str) -> None:
    out = _ask("hi", "--url", loading_server, "--wait", "1", timeout=120)
    assert out.returncode == 1
    assert "is loading its models; waiting up to 1s" in out.stderr
    assert f"the server at {loading_server} is still loading its models after 1s" in out.stderr
