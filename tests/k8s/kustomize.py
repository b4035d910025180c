"""The part of kustomize that pice's overlays use, for offline tests (no kustomize binary here):
`resources` (files, or directories holding a kustomization.yaml) and `patches` that are JSON 6902
operation lists with a target (group/version/kind/name). Anything else in a kustomization fails
the test, so the overlays cannot drift into features this does not render."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "patches"}


def build(directory: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN
    assert not unknown, f"{directory}: kustomization fields this renderer lacks: {unknown}"
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: only JSON 6902 patches: {patch}"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        matches = [d for d in docs if _targets(d, patch["target"])]
        assert len(matches) == 1, f"{directory}: patch target {patch['target']} matched " \
                                  f"{len(matches)} resources"
        for op in ops:
            _apply(matches[0], op)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate resources {keys}"
    return docs


def _targets(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": doc["kind"],
            "name": doc["metadata"]["name"]}
    return all(want[k] == v for k, v in target.items())


def _apply(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """RFC 6902 add / replace / remove."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    kind = op["op"]
    if kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif kind == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            assert kind == "add" or last in parent, f"replace of a missing {op['path']}"
            parent[last] = value
    else:
        raise AssertionError(f"unsupported patch op {kind!r}")
