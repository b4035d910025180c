"""One distribution, `pice`, with every module under the `pice` namespace."""

import importlib
import importlib.metadata

import pytest


@pytest.mark.parametrize("module", ["pice.cloud", "pice.edge", "pice.scheduler", "pice.shared",
                                    "pice.kernels", "pice.cli", "pice.cloud.api.app"])
def test_modules_import_under_pice(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_no_generic_top_level_packages_installed() -> None:
    files = importlib.metadata.files("pice") or []
    tops = {f.parts[0] for f in files if f.parts and not f.parts[0].endswith(".dist-info")}
    tops = {t for t in tops if not t.startswith("__editable__") and not t.endswith(".pth")}
    assert tops <= {"pice", "..", "bin"}, tops
    assert importlib.metadata.entry_points(group="console_scripts", name="pice")
