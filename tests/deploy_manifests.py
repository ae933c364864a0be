"""Read deploy/ the way `kubectl apply -k` does, and validate an InferencePool offline.

The kustomizations in deploy/ hold plain `resources:` only (no generators, patches or
transformers), so rendering one is: follow the list, load every YAML document, recurse into
directories. Anything else in a kustomization.yaml is refused here, which keeps the rule true.
``kubectl kustomize`` (when a kubectl is installed) is compared with this rendering in the tests.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRD_FILE = DEPLOY / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
KUSTOMIZATION = "kustomization.yaml"
# What a kustomization here may say: nothing that needs the kustomize binary to render.
PLAIN_KEYS = frozenset({"apiVersion", "kind", "resources"})

Obj = dict[str, Any]


class ManifestError(AssertionError):
    pass


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a manifest file."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise ManifestError(f"{path}: a document without apiVersion/kind")
    return docs


def _kustomization(directory: Path) -> Obj:
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise ManifestError(f"{directory}: no {KUSTOMIZATION}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    extra = set(data) - PLAIN_KEYS
    if extra:
        raise ManifestError(
            f"{path}: {sorted(extra)} needs the kustomize binary to render; deploy/ keeps to plain "
            "`resources:` (an overlay of the user's can add the rest)"
        )
    if data.get("kind", "Kustomization") != "Kustomization":
        raise ManifestError(f"{path}: kind must be Kustomization")
    return data


def included_files(directory: Path) -> list[Path]:
    """The manifest files a kustomization directory pulls in, recursively, in order."""
    files: list[Path] = []
    for entry in _kustomization(directory).get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            files += included_files(target)
        elif target.is_file():
            files.append(target)
        else:
            raise ManifestError(f"{directory / KUSTOMIZATION}: resource {entry!r} does not exist")
    return files


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl apply -k directory` would send (for plain kustomizations)."""
    objs: list[Obj] = []
    seen: set[tuple[str, str, str]] = set()
    for path in included_files(directory):
        for obj in load_documents(path):
            key = (obj["apiVersion"].split("/")[0], obj["kind"], obj["metadata"]["name"])
            if key in seen:  # kustomize refuses two objects with one id
                raise ManifestError(f"{directory}: {key} twice")
            seen.add(key)
            objs.append(obj)
    return objs


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise ManifestError(f"expected one {kind}/{name}, found {len(matches)}")
    return matches[0]


def containers(obj: Obj) -> list[Obj]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise ManifestError(f"container {container['name']!r} has no port {port!r}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- InferencePool


@cache
def inferencepool_crd() -> Obj:
    data: Obj = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    return data


def _closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists properties.

    The API server prunes (or, with kubectl's default strict field validation, refuses)
    fields a structural schema does not list; JSON Schema would accept them silently.
    """
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def inferencepool_schema(version: str = "v1") -> Obj:
    for v in inferencepool_crd()["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # metadata is the API server's (ObjectMeta); the CRD leaves it open.
            return _closed(schema)  # type: ignore[no-any-return]
    raise ManifestError(f"the CRD has no version {version}")


def _cel_rules(obj: Obj) -> list[str]:
    """The CRD's x-kubernetes-validations (CEL), which JSON Schema cannot express."""
    errors = []
    spec = obj.get("spec", {})
    ref = spec.get("endpointPickerRef")
    if ref is not None and ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append(
            "spec.endpointPickerRef: port is required when kind is 'Service' or unspecified"
        )
    numbers = [p.get("number") for p in spec.get("targetPorts", [])]
    if len(numbers) != len(set(numbers)):
        errors.append("spec.targetPorts: port number must be unique")
    return errors


def inferencepool_errors(obj: Obj) -> list[str]:
    """Why the API server (with the vendored CRD) would refuse ``obj``; [] if it would not."""
    apiversion = obj.get("apiVersion", "")
    group, _, version = apiversion.partition("/")
    if group != inferencepool_crd()["spec"]["group"]:
        return [f"apiVersion {apiversion!r} is not {inferencepool_crd()['spec']['group']}/..."]
    validator = jsonschema.Draft7Validator(inferencepool_schema(version))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]
    return errors + _cel_rules(obj)
