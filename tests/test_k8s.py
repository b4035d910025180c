"""The manifests parse and wire the probes to the endpoints the app serves."""

from pathlib import Path

import pytest
import yaml

from pice.shared.config import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_manifests_match_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "pice.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["pice", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # every PICE_* variable in the ConfigMap is a valid setting with a valid value
    env = kinds["ConfigMap"]["data"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings()
    assert settings.port == 8000
    assert settings.edge_models == ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
