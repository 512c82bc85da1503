"""Just enough of kustomize to render deploy/k8s without a cluster or the kustomize binary:
``resources`` (files and directories), ``namespace``, ``images``, ``labels`` and JSON 6902
``patches`` with a target. Anything else in a kustomization.yaml is refused, so a feature the
manifests start to use cannot be skipped silently."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "images", "labels", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
}


def render(folder: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN
    if unknown:
        raise ValueError(f"{folder}: kustomization fields this renderer does not know: {unknown}")
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = folder / res
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for label in kust.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
            tpl = d.get("spec", {}).get("template") if isinstance(d.get("spec"), dict) else None
            if label.get("includeTemplates") and isinstance(tpl, dict):
                tpl.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        target = patch["target"]
        hits = [
            d
            for d in docs
            if d["kind"] == target["kind"]
            and d["metadata"]["name"] == target["name"]
            and d["apiVersion"].split("/")[-1] == target["version"]
        ]
        if len(hits) != 1:
            raise ValueError(f"{folder}: patch {patch['path']} matches {len(hits)} resources")
        for op in ops:
            apply_op(hits[0], op)
    for img in kust.get("images", []):
        for d in docs:
            for c in _containers(d):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def apply_op(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove); the path must exist except for ``add``."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node: Any = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if op["op"] == "remove":
        del node[key]
    elif op["op"] == "replace":
        node[key]  # KeyError/IndexError: replacing what is not there
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"unsupported patch op {op['op']!r}")
