"""One distribution, `pice`, with every module under the `pice` namespace."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["pice.cloud", "pice.edge", "pice.scheduler", "pice.shared",
                                    "pice.kernels", "pice.cli", "pice.cloud.api.app"])
def test_modules_import_under_pice(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_wheel_installs_only_the_pice_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)
    [wheel] = tmp_path.glob("pice-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pice"}
    for sub in ("cloud", "edge", "scheduler", "shared", "kernels", "bench"):
        assert f"pice/{sub}/__init__.py" in names
    assert "pice/bench/questions.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pice = pice.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
