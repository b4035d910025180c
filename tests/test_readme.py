"""The README's examples run as written: every ```bash and ```python block is run against a live
tiny-model server on loopback, with only these substitutions: the server's address for
`localhost:8000` (and PICE_PORT for `pice ask`), this interpreter for `.venv/bin/pice`, and a
PEFT adapter of the tiny model for the shipped adapter's directory (the real one is for
qwen2.5-coder-0.5b-instruct). A block that cannot run here (it installs, serves forever, trains
or rewrites files) is preceded by `<!-- readme-test: skip REASON -->`; every other bash or python
block runs, so a new example is run or explicitly marked. ```text and unlabelled blocks are
output and layout, not run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pice.shared.config import ServeSettings
from tests.conftest import LiveServer, _free_port
from tests.factories import peft_adapter

README = Path(__file__).resolve().parents[1] / "README.md"
SHIPPED_DIR = "edge/distill/adapters/qwen2.5-coder-0.5b-instruct"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip (?P<why>[^>]*?) -->\s*\n)?"
                    r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.M | re.S)


def blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason) of every fenced block, in order."""
    return [(m["lang"], m["code"], m["why"]) for m in _BLOCK.finditer(README.read_text())]


RUNNABLE = [(lang, code) for lang, code, why in blocks() if lang in ("bash", "python")
            and why is None]


def test_blocks_are_found_and_marked() -> None:
    found = blocks()
    assert len(RUNNABLE) >= 4, found
    for lang, code, why in found:
        if lang in ("bash", "python") and why is None:
            assert "make serve" not in code and "pice serve" not in code, code  # never ends
    assert any(why and "make serve" in code for _, code, why in found)


@pytest.fixture(scope="module")
def site(sketch_model_dir: Path, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[LiveServer, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("readme")
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(tiny_model_dir)], max_context=1024,
                             default_max_tokens=48, cache_dir=tmp / "cache",
                             state_dir=tmp / "state", guard=False)
    live = LiveServer(settings)
    live.start()
    subs = {"localhost:8000": f"127.0.0.1:{settings.port}",
            ".venv/bin/pice": f"{shlex.quote(sys.executable)} -m pice",
            SHIPPED_DIR: str(peft_adapter(tiny_model_dir, tmp / "adapter", rank=4, seed=3))}
    yield live, subs
    live.stop()


@pytest.mark.parametrize(("lang", "code"), RUNNABLE,
                         ids=[f"{i}-{lang}" for i, (lang, _) in enumerate(RUNNABLE)])
def test_readme_block_runs(site: tuple[LiveServer, dict[str, str]], lang: str, code: str,
                           tmp_path: Path) -> None:
    live, subs = site
    for old, new in subs.items():
        code = code.replace(old, new)
    env = {**os.environ, "PICE_PORT": live.url.rsplit(":", 1)[1], "KEY": "unused"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else \
        [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                         cwd=README.parent)
    assert out.returncode == 0, f"{code}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    # curl exits 0 on an error status: the body (or an SSE error event) tells
    assert '"error":{' not in out.stdout.replace(" ", "") and "event: error" not in out.stdout, \
        out.stdout
    assert out.stdout.strip(), f"{code} printed nothing"
