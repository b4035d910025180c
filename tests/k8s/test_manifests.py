"""The Kubernetes manifests, offline: every overlay renders, every built-in resource validates
against Kubernetes' schemas (kubernetes-validate, strict), the RayService against pice's schema of
the KubeRay CRD fields (pod templates checked as Kubernetes PodTemplateSpecs), the Serve configs
against Serve's own schema, and the wiring matches the app (probes, settings, secrets, ports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

from pice.cloud.edge_tokens import TokenFile
from pice.cloud.tenants import KeysFile
from pice.shared.config import ServeSettings
from tests.k8s.kustomize import build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["deployment", "rayservice", "rayservice-gpu"]
K8S_VERSION = "1.33"
IMAGE = "pice:0.1.0"


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / "overlays" / overlay)}


def rayservice_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "schemas" / "rayservice-ray-v1.json").read_text())
    defs = schema_contents("kubernetes-json-schema/v1.33.0-local-strict/_definitions.json",
                           K8S_VERSION)
    registry = referencing.Registry().with_resources([
        (defs["$id"], referencing.Resource.from_contents(defs)),
        (schema["$id"], referencing.Resource.from_contents(schema))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates(overlay: str) -> None:
    for (kind, name), doc in rendered(overlay).items():
        if kind == "RayService":
            errors = sorted(rayservice_validator().iter_errors(doc), key=str)
            assert not errors, f"{name}: {errors[0].json_path}: {errors[0].message}"
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_rayservice_schema_catches_mistakes() -> None:
    doc = rendered("rayservice")[("RayService", "pice")]
    v = rayservice_validator()
    bad = json.loads(json.dumps(doc))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e.json_path for e in v.iter_errors(bad))
    bad = json.loads(json.dumps(doc))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "ports"][0]["containerPort"] = "gcs"  # a Kubernetes type error inside the pod template
    assert any("containerPort" in e.json_path for e in v.iter_errors(bad))
    bad = json.loads(json.dumps(doc))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert list(v.iter_errors(bad))  # KubeRay takes only strings there


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    if doc["kind"] == "Deployment":
        templates = [spec["template"]]
    else:
        cluster = spec["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]
    return [c for t in templates for c in [*t["spec"].get("initContainers", []),
                                           *t["spec"]["containers"]]]


def test_gateway_deployment_wiring() -> None:
    docs = rendered("deployment")
    gw = docs[("Deployment", "pice-gateway")]
    [pice] = gw["spec"]["template"]["spec"]["containers"]
    assert pice["command"] == ["pice", "serve"]
    assert pice["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pice["livenessProbe"]["httpGet"]["path"] == "/health"
    labels = gw["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        sel = next(d for (k, _), d in docs.items() if k == kind)["spec"]
        match = (sel.get("selector") or sel["podSelector"])["matchLabels"]
        assert match.items() <= labels.items(), kind
    assert docs[("HorizontalPodAutoscaler", "pice-gateway")]["spec"]["scaleTargetRef"][
        "name"] == "pice-gateway"
    ingress = docs[("Ingress", "pice")]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == \
        docs[("Service", "pice")]["metadata"]["name"]
    # agent WebSockets stay open for an hour through the ingress controller
    assert int(ingress["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600


def test_rayservice_head_does_no_work_and_gpu_limits_equal_requests() -> None:
    cpu = rendered("rayservice")[("RayService", "pice")]["spec"]["rayClusterConfig"]
    assert cpu["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert [g["groupName"] for g in cpu["workerGroupSpecs"]] == ["cpu"]
    gpu = rendered("rayservice-gpu")[("RayService", "pice")]["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in gpu["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    res = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_secrets_are_what_the_app_accepts(overlay: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    docs = rendered(overlay)
    secret = docs[("Secret", "pice-secrets")]["stringData"]
    KeysFile.model_validate_json(secret["api-keys.json"])
    TokenFile.model_validate_json(secret["edge-tokens.json"])
    for key, value in docs[("ConfigMap", "pice-config")]["data"].items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings()
    assert settings.port == 8000
    for c in containers(next(d for (k, _), d in docs.items()
                             if k in ("Deployment", "RayService"))):
        assert c["image"].startswith(IMAGE)
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        assert mounts["models"] == str(settings.cache_dir)
        if "secrets" in mounts:  # the files the settings name live in the mounted Secret
            for path in (settings.api_keys_file, settings.edge_tokens_file):
                assert path is not None and path.parent == Path(mounts["secrets"])
                assert path.name in secret


def serve_apps(text: str) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    return dict(config)


@pytest.mark.parametrize("overlay", ["rayservice", "rayservice-gpu"])
def test_serve_configs_validate_and_build(overlay: str) -> None:
    pytest.importorskip("ray.serve")
    from pice.cloud.serve.app import build_app

    file_config = serve_apps((K8S / "ray" / "serve-config.yaml").read_text())
    config = serve_apps(rendered(overlay)[("RayService", "pice")]["spec"]["serveConfigV2"])
    [app] = config["applications"]
    assert app["import_path"] == "pice.cloud.serve.app:build_app"
    built = build_app(app["args"])  # the builder accepts the args (no cluster needed)
    assert type(built).__name__ == "Application"
    if overlay == "rayservice":
        assert config == file_config  # `serve run` and KubeRay deploy the same thing
    else:
        assert app["args"]["ray"]["cloud_num_gpus"] == 1
        assert app["args"]["settings"]["cloud_backend"] == "vllm"


def test_dockerfile_builds_the_image_the_manifests_name() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and 'extras="models,ray"' in text
    assert 'CMD ["pice", "serve"' in text
