"""Kubernetes discovery (extproc/k8s_discovery.py).

The pure parts (selector and port parsing, pool → target, pod → endpoints, credentials,
settings validation) on plain data; then :class:`K8sDiscovery` in-process against the fake API
server of tests/fake_k8s.py, which speaks the real list/watch wire protocol over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx2 as httpx
import pytest
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import Status
from lightkube.resources.core_v1 import Pod

from extproc.config import ConfigError, load_settings
from extproc.k8s_discovery import (
    Backoff,
    K8sDiscovery,
    Target,
    WatchTiming,
    backend_url,
    build_k8s_discovery,
    default_namespace,
    describe_error,
    load_kube_config,
    parse_ports,
    parse_selector,
    pod_endpoints,
    pod_is_ready,
    pool_target,
    status_code,
)
from tests.fake_k8s import PODS, POOLS, FakeKube

# ------------------------------------------------------------------ pure parts


def pod(
    name: str = "p",
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    terminating: bool = False,
    conditions: list[dict[str, str]] | None = None,
) -> Pod:
    meta: dict[str, Any] = {"name": name, "labels": {"app": "vllm"} if labels is None else labels}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "conditions": conditions
        if conditions is not None
        else [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
    }
    if ip:
        status["podIP"] = ip
    return cast(Pod, Pod.from_dict({"metadata": meta, "status": status}))


@pytest.mark.parametrize(
    "text, labels",
    [
        ("app=vllm", {"app": "vllm"}),
        (" app = vllm , tier==gold ", {"app": "vllm", "tier": "gold"}),
        ("app.kubernetes.io/name=vllm,empty=", {"app.kubernetes.io/name": "vllm", "empty": ""}),
        ("a=b,a=b", {"a": "b"}),
    ],
)
def test_selector_parses_equality_terms(text: str, labels: dict[str, str]) -> None:
    assert parse_selector(text) == labels


@pytest.mark.parametrize(
    "text, message",
    [
        ("app", "key=value"),
        ("app!=vllm", "key=value"),
        ("app=a=b", "key=value"),
        ("", "empty"),
        (" , ", "empty"),
        ("-bad=x", "label key"),
        ("app=bad value", "label value"),
        ("app=" + "x" * 64, "label value"),
        ("a=b,a=c", "twice"),
    ],
)
def test_bad_selectors_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_selector(text)


def test_ports_from_repeats_and_comma_lists() -> None:
    assert parse_ports(["8000,8001", 9000, " 8000 ", ""]) == [8000, 8001, 9000]
    for bad in (["0"], ["65536"], ["http"], ["-1"]):
        with pytest.raises(ValueError, match="1-65535"):
            parse_ports(bad)


def test_pool_target_reads_match_labels_and_target_ports() -> None:
    pool = {
        "spec": {
            "selector": {"matchLabels": {"app": "vllm", "tier": "a"}},
            "targetPorts": [{"number": 8001}, {"number": 8000}, {"number": 8000}],
        }
    }
    assert pool_target(pool) == Target((("app", "vllm"), ("tier", "a")), (8000, 8001))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "matchLabels"),
        ({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}, "matchLabels"),
        ({"selector": {"matchLabels": {"a": "b"}}}, "targetPorts"),
        (
            {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 0}]},
            "invalid entry",
        ),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": ["8000"]}, "invalid entry"),
    ],
)
def test_unusable_pools_are_refused_with_the_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pool_target({"spec": spec})


@pytest.mark.parametrize(
    "p, ready",
    [
        (pod(), True),
        (pod(ready=False), False),
        (pod(terminating=True), False),  # still Ready during its grace period: must leave at once
        (pod(ip=None), False),
        (pod(conditions=[]), False),
        (pod(conditions=[{"type": "ContainersReady", "status": "True"}]), False),
        (Pod.from_dict({"metadata": {"name": "x"}}), False),  # no status yet
    ],
)
def test_pod_readiness(p: Pod, ready: bool) -> None:
    assert pod_is_ready(p) is ready


def test_pod_endpoints_are_ready_matching_pods_times_ports_sorted_and_deduped() -> None:
    pods = [
        pod("b", "10.0.0.2"),
        pod("a", "10.0.0.1"),
        pod("dup", "10.0.0.1"),  # same IP twice (hostNetwork pods): one backend per port
        pod("v6", "fd00::1"),
        pod("other", "10.0.0.3", labels={"app": "other"}),
        pod("down", "10.0.0.4", ready=False),
        pod("bye", "10.0.0.5", terminating=True),
        pod("weird", "not-an-ip"),
    ]
    assert pod_endpoints(pods, {"app": "vllm"}, [8001, 8000]) == [
        "http://10.0.0.1:8000",
        "http://10.0.0.1:8001",
        "http://10.0.0.2:8000",
        "http://10.0.0.2:8001",
        "http://[fd00::1]:8000",
        "http://[fd00::1]:8001",
    ]
    assert (
        backend_url("::1", 80) == "http://[::1]:80"
        and backend_url("127.0.0.2", 80) == "http://127.0.0.2:80"
    )


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next() for _ in range(6)]
    for delay, step in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays)  # jittered: replicas do not retry in lockstep
    b.reset()
    assert b.next() <= 0.5


def test_error_descriptions_carry_the_status_and_an_rbac_hint() -> None:
    forbidden = ApiError(status=Status(code=403, message='pods is forbidden: User "x"'))
    assert status_code(forbidden) == 403
    assert "HTTP 403 pods is forbidden" in describe_error(
        forbidden
    ) and "get/list/watch" in describe_error(forbidden)
    request = httpx.Request("GET", "http://127.0.0.1/api")
    gone = httpx.HTTPStatusError(
        "gone", request=request, response=httpx.Response(410, request=request)
    )
    assert status_code(gone) == 410 and describe_error(gone) == "HTTP 410 Gone"
    refused = httpx.ConnectError("All connection attempts failed")
    assert (
        status_code(refused) is None
        and describe_error(refused) == "ConnectError: All connection attempts failed"
    )
    assert describe_error(TimeoutError()) == "TimeoutError"


# ------------------------------------------------------------------ credentials and namespace


def kubeconfig(
    tmp_path: Path, server: str = "http://127.0.0.1:1", namespace: str | None = "team-a"
) -> Path:
    ctx = f"{{cluster: c, user: u{', namespace: ' + namespace if namespace else ''}}}"
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"apiVersion: v1\nkind: Config\ncurrent-context: x\nclusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n"
        f"users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {ctx}}}]\n"
    )
    return path


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KUBECONFIG, no in-cluster env, an empty HOME: every source absent until a test adds one."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sa = tmp_path / "sa"
    sa.mkdir()
    return sa


def test_kubeconfig_from_the_environment_and_its_context_namespace(
    no_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, "http://127.0.0.1:6443")))
    config = load_kube_config(no_cluster)
    assert config.cluster.server == "http://127.0.0.1:6443"
    assert default_namespace(config, no_cluster) == "team-a"


def test_context_without_namespace_means_default(
    no_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, namespace=None)))
    assert default_namespace(load_kube_config(no_cluster), no_cluster) == "default"


def test_home_kubeconfig_is_the_last_resort(no_cluster: Path, tmp_path: Path) -> None:
    home = tmp_path / "home" / ".kube"
    home.mkdir(parents=True)
    kubeconfig(tmp_path).rename(home / "config")
    assert load_kube_config(no_cluster).cluster.server == "http://127.0.0.1:1"


def test_in_cluster_service_account_and_the_pods_own_namespace(
    no_cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in (("token", "sa-token"), ("namespace", "inference\n"), ("ca.crt", "")):
        (no_cluster / name).write_text(text)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = load_kube_config(no_cluster)
    assert config.cluster.server == "https://10.96.0.1:443"
    assert default_namespace(config, no_cluster) == "inference"


def test_missing_or_broken_credentials_are_config_errors(
    no_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="needs credentials"):
        load_kube_config(no_cluster)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot load Kubernetes credentials"):
        load_kube_config(no_cluster)
    bad = tmp_path / "bad"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    with pytest.raises(ConfigError, match="(?i)no current context"):
        load_kube_config(no_cluster)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "cli, message",
    [
        (
            {"k8s_inference_pool": "p", "k8s_selector": "app=vllm", "k8s_target_port": ["8000"]},
            "exclude each other",
        ),
        ({"k8s_selector": "app=vllm"}, "needs --k8s-target-port"),
        ({"k8s_target_port": ["8000"]}, "goes with --k8s-selector"),
        ({"k8s_inference_pool": "p", "k8s_target_port": ["8000"]}, "goes with --k8s-selector"),
        ({"k8s_selector": "app", "k8s_target_port": ["8000"]}, "key=value"),
        ({"k8s_selector": "app=vllm", "k8s_target_port": ["80000"]}, "1-65535"),
        ({"k8s_inference_pool": "My_Pool"}, "not a Kubernetes name"),
        ({"k8s_inference_pool": "p", "k8s_namespace": "Bad"}, "not a Kubernetes name"),
        ({"k8s_inference_pool": "p", "backend": ["http://127.0.0.1:8000"]}, "replaces --backend"),
        (
            {"k8s_selector": "a=b", "k8s_target_port": ["1"], "backends_dns": ["vllm:8000"]},
            "replaces --backend",
        ),
    ],
)
def test_k8s_settings_errors_are_readable(cli: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(cli)


def test_k8s_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings({"k8s_selector": " app=vllm ", "k8s_target_port": ["8000,8001", "9000"]})
    assert (s.k8s_selector, s.k8s_target_port) == ("app=vllm", [8000, 8001, 9000])
    monkeypatch.setenv("EXTPROC_K8S_INFERENCE_POOL", "vllm-pool")
    monkeypatch.setenv("EXTPROC_K8S_NAMESPACE", "inference")
    s = load_settings({})
    assert (s.k8s_inference_pool, s.k8s_namespace, s.k8s_target_port) == (
        "vllm-pool",
        "inference",
        [],
    )


def test_build_from_settings_reads_credentials_and_namespace(
    no_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path)))
    d = build_k8s_discovery(
        load_settings({"k8s_selector": "app=vllm", "k8s_target_port": ["8000"]}),
        lambda urls: None,
        sa_dir=no_cluster,
    )
    assert d.namespace == "team-a" and d.target == Target((("app", "vllm"),), (8000,))
    d = build_k8s_discovery(
        load_settings({"k8s_inference_pool": "p", "k8s_namespace": "other"}),
        lambda urls: None,
        sa_dir=no_cluster,
    )
    assert (d.namespace, d.pool, d.target) == ("other", "p", None)
    with pytest.raises(ValueError, match="exactly one"):
        K8sDiscovery(d.client, lambda urls: None, namespace="x")
    with pytest.raises(ValueError, match="target ports"):
        K8sDiscovery(d.client, lambda urls: None, namespace="x", selector={"a": "b"})


# ------------------------------------------------------------------ against the fake API server

FAST = WatchTiming(watch_seconds=2.0, backoff=0.05, max_backoff=0.3)


class Changes:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.errors: list[str] = []

    def __call__(self, urls: list[str]) -> None:
        self.calls.append(list(urls))

    @property
    def last(self) -> list[str] | None:
        return self.calls[-1] if self.calls else None


async def until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def urls(*ips: str, port: int = 8000) -> list[str]:
    return [f"http://{ip}:{port}" for ip in ips]


@pytest.fixture
async def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeKube]:
    fake = await asyncio.to_thread(FakeKube().start)
    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield fake
    finally:
        await asyncio.to_thread(fake.stop)


@pytest.fixture
async def discover(k8s: FakeKube) -> AsyncIterator[Callable[..., Any]]:
    """Factory: a started K8sDiscovery on the fake (1 s request timeout, fast retries)."""
    started: list[K8sDiscovery] = []

    async def make(**kwargs: Any) -> tuple[K8sDiscovery, Changes]:
        changes = Changes()
        client = AsyncClient(
            config=load_kube_config(), namespace="default", timeout=httpx.Timeout(1.0)
        )
        d = K8sDiscovery(
            client,
            changes,
            namespace="default",
            on_error=changes.errors.append,
            timing=FAST,
            rng=random.Random(7),
            **kwargs,
        )
        await d.start()
        started.append(d)
        return d, changes

    yield make
    for d in started:
        await d.stop()
        assert d._pods_task is None or d._pods_task.done()


async def test_selector_follows_pods_through_their_life(
    k8s: FakeKube, discover: Callable[..., Any]
) -> None:
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    k8s.add_pod("other", "127.0.0.9", {"app": "other"})
    d, changes = await discover(selector={"app": "vllm"}, ports=[8000])
    await asyncio.wait_for(d.synced.wait(), 5)
    assert changes.calls == [urls("127.0.0.2")]  # the first list, published once

    k8s.add_pod("b", "127.0.0.3", {"app": "vllm"}, ready=False)  # starting: not yet a backend
    k8s.add_pod("c", "127.0.0.4", {"app": "vllm"})
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.4"), "pod c added")
    k8s.set_pod_ready("b", True)
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3", "127.0.0.4"), "b ready")
    k8s.set_pod_ready("a", False)
    await until(lambda: changes.last == urls("127.0.0.3", "127.0.0.4"), "a not ready")
    k8s.terminate_pod("c")  # still Ready, but deletion started
    await until(lambda: changes.last == urls("127.0.0.3"), "c terminating")
    k8s.delete_pod("c")
    k8s.set_pod_labels("b", {"app": "moved"})  # relabelled away: the watch says DELETED
    await until(lambda: changes.last == [], "b relabelled")
    k8s.add_pod("v6", "fd00::7", {"app": "vllm"})
    await until(lambda: changes.last == ["http://[fd00::7]:8000"], "an IPv6 pod")
    assert d.current() == ["http://[fd00::7]:8000"]
    assert k8s.requests("list", PODS) == 1  # all of it from one list and its watch
    assert not changes.errors


async def test_pool_changes_apply_live(
    k8s: FakeKube, discover: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "extproc.k8s_discovery")
    for name, ip, tier in (("a", "127.0.0.2", "gold"), ("b", "127.0.0.3", "silver")):
        k8s.add_pod(name, ip, {"app": "vllm", "tier": tier})
    k8s.set_pool("other-pool", {"app": "nothing"}, [1])  # another pool of the namespace: ignored
    d, changes = await discover(pool="pool")
    await asyncio.wait_for(d.synced.wait(), 5)
    assert changes.calls == [[]]  # the pool does not exist (yet): synced, no backends
    assert "does not exist" in caplog.text

    k8s.set_pool("pool", {"app": "vllm"}, [8000])
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3"), "pool created")
    k8s.set_pool("pool", {"app": "vllm", "tier": "gold"}, [8000])  # selector change: other pods
    await until(lambda: changes.last == urls("127.0.0.2"), "selector change")
    lists = k8s.requests("list", PODS)
    k8s.set_pool("pool", {"app": "vllm", "tier": "gold"}, [8000, 8001])  # ports only: no new list
    await until(
        lambda: changes.last == ["http://127.0.0.2:8000", "http://127.0.0.2:8001"],
        "target ports change",
    )
    assert k8s.requests("list", PODS) == lists
    n = len(changes.calls)
    k8s.do(
        lambda s: s.set_pool("pool", {"app": "vllm", "tier": "gold"}, [8000, 8001])
    )  # no-op MODIFIED
    k8s.set_pod_ready("b", False)  # b is outside the selector: nothing to publish either
    k8s.add_pod("g2", "127.0.0.5", {"app": "vllm", "tier": "gold"})
    await until(lambda: len(changes.calls) > n, "g2 added")
    assert changes.calls[n:] == [
        [
            "http://127.0.0.2:8000",
            "http://127.0.0.2:8001",
            "http://127.0.0.5:8000",
            "http://127.0.0.5:8001",
        ]
    ]

    k8s.set_pool(
        "pool",
        {},
        [8000],
        spec={"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
    )
    await until(lambda: changes.last == [], "an unusable pool empties the set")
    assert "unusable: spec.selector.matchLabels is missing or empty" in caplog.text
    k8s.set_pool("pool", {"app": "vllm"}, [8000])
    await until(
        lambda: changes.last == urls("127.0.0.2", "127.0.0.5"), "pool usable again"
    )  # b is not ready
    caplog.clear()
    k8s.delete_pool("pool")
    await until(lambda: changes.last == [], "pool deleted")
    assert "does not exist (deleted?)" in caplog.text
    assert not changes.errors


@pytest.mark.parametrize("how", ["event", "status"])
async def test_410_gone_relists_and_misses_nothing(
    k8s: FakeKube, discover: Callable[..., Any], how: str
) -> None:
    k8s.set_pool("pool", {"app": "vllm"}, [8000])
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    k8s.add_pod("b", "127.0.0.3", {"app": "vllm"})
    d, changes = await discover(pool="pool")
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3"), "initial list")
    pod_lists, pool_lists = k8s.requests("list", PODS), k8s.requests("list", POOLS)

    # A change and a compaction in one step: no watch sees the change, only a new list can.
    def change_and_compact(s: Any) -> None:
        s.delete_pod("a")
        s.add_pod("c", "127.0.0.4", {"app": "vllm"})
        s.expire(how)

    k8s.do(change_and_compact)
    await until(lambda: changes.last == urls("127.0.0.3", "127.0.0.4"), "the relist's view")
    assert k8s.requests("list", PODS) == pod_lists + 1
    assert k8s.requests("list", POOLS) == pool_lists + 1
    k8s.add_pod("d", "127.0.0.5", {"app": "vllm"})  # and the new watch works
    await until(
        lambda: changes.last == urls("127.0.0.3", "127.0.0.4", "127.0.0.5"), "watch after relist"
    )
    assert not changes.errors


@pytest.mark.parametrize("mode", ["503", "refused", "hang"])
async def test_an_api_outage_keeps_the_last_good_set(
    k8s: FakeKube, discover: Callable[..., Any], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    k8s.set_pool("pool", {"app": "vllm"}, [8000])
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    d, changes = await discover(pool="pool")
    await until(lambda: changes.last == urls("127.0.0.2"), "initial list")
    k8s.outage(mode)  # type: ignore[arg-type]
    seen = k8s.requests()
    # The clients keep trying (watches reconnect, hang until their window, back off) ...
    await until(
        lambda: (
            k8s.requests() >= seen + 4 or (mode == "refused" and caplog.text.count("failed (") >= 4)
        ),
        "retries during the outage",
        timeout=15,
    )
    assert changes.last == urls("127.0.0.2") and d.current() == urls(
        "127.0.0.2"
    )  # ... never emptied
    k8s.do(lambda s: s.add_pod("b", "127.0.0.3", {"app": "vllm"}))  # changed while unreachable
    k8s.recover()
    await until(
        lambda: changes.last == urls("127.0.0.2", "127.0.0.3"),
        "catch-up after recovery",
        timeout=15,
    )
    assert [] not in changes.calls
    assert not changes.errors  # API trouble is handled, not a task crash


async def test_not_synced_while_the_api_is_down_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = await asyncio.to_thread(FakeKube().start, listening=False)
    try:
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kc")))
        fake.do(lambda s: s.add_pod("a", "127.0.0.2", {"app": "vllm"}))
        changes = Changes()
        client = AsyncClient(config=load_kube_config(), timeout=httpx.Timeout(1.0))
        d = K8sDiscovery(
            client,
            changes,
            namespace="default",
            selector={"app": "vllm"},
            ports=[8000],
            timing=FAST,
        )
        await d.start()  # returns at once although nothing answers
        await until(
            lambda: d.pods_watch is not None and d.pods_watch.failures >= 2, "failed attempts"
        )
        assert not d.synced.is_set() and changes.calls == []
        await asyncio.to_thread(fake.recover)
        await asyncio.wait_for(d.synced.wait(), 10)
        assert changes.calls == [urls("127.0.0.2")]
        await d.stop()
    finally:
        await asyncio.to_thread(fake.stop)


async def test_watches_are_reopened_from_the_last_version_without_a_relist(
    k8s: FakeKube, discover: Callable[..., Any]
) -> None:
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    _, changes = await discover(selector={"app": "vllm"}, ports=[8000])
    await until(lambda: changes.last == urls("127.0.0.2"), "initial list")
    watches = k8s.requests("watch", PODS)
    await until(
        lambda: k8s.requests("watch", PODS) >= watches + 2, "watch windows ending", timeout=10
    )
    k8s.add_pod("b", "127.0.0.3", {"app": "vllm"})
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3"), "event on a reopened watch")
    assert k8s.requests("list", PODS) == 1
    queries = k8s.do(lambda s: [q for verb, _, q in s.requests if verb == "watch"])
    assert all(
        "timeoutSeconds=1" in q and "resourceVersion=" in q for q in queries
    )  # window 1.8-2 s


async def test_unexpected_errors_are_counted_and_the_watch_restarts(
    k8s: FakeKube, discover: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    calls = {"n": 0}
    original = K8sDiscovery._pod_event

    def flaky(self: K8sDiscovery, kind: str, p: Pod) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in an event handler")
        original(self, kind, p)

    monkeypatch.setattr(K8sDiscovery, "_pod_event", flaky)
    _, changes = await discover(selector={"app": "vllm"}, ports=[8000])
    await until(lambda: changes.last == urls("127.0.0.2"), "initial list")
    k8s.add_pod(
        "b", "127.0.0.3", {"app": "vllm"}
    )  # its event raises: the task restarts and relists
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3"), "recovered by a relist")
    assert changes.errors == ["k8s-pods-watch"]


async def test_the_fake_speaks_bookmarks_timeouts_and_410_like_the_api(tmp_path: Path) -> None:
    """The fake's own protocol, read raw: the discovery tests are only as good as it is."""
    import aiohttp
    import orjson

    fake = await asyncio.to_thread(FakeKube(bookmark_interval=0.2).start)
    try:
        fake.add_pod("a", "127.0.0.2", {"app": "vllm"})
        pods = f"{fake.url}/api/v1/namespaces/default/pods"
        async with aiohttp.ClientSession() as s:
            async with s.get(pods, params={"labelSelector": "app=vllm"}) as r:
                listing = await r.json()
            rv = listing["metadata"]["resourceVersion"]
            assert [p["metadata"]["name"] for p in listing["items"]] == ["a"]
            t0 = time.monotonic()
            params = {
                "watch": "true",
                "resourceVersion": "0",
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "1",
                "labelSelector": "app=vllm",
            }
            async with s.get(pods, params=params) as r:
                events = [orjson.loads(line) async for line in r.content if line.strip()]
            assert 0.9 <= time.monotonic() - t0 < 5  # ended by timeoutSeconds
            assert events[0]["type"] == "ADDED" and {e["type"] for e in events[1:]} == {"BOOKMARK"}
            assert all(int(e["object"]["metadata"]["resourceVersion"]) >= int(rv) for e in events)
            fake.expire("event")
            async with s.get(pods, params={"watch": "1", "resourceVersion": rv}) as r:
                assert r.status == 200
                (error,) = [orjson.loads(line) async for line in r.content if line.strip()]
            assert error["type"] == "ERROR" and error["object"]["code"] == 410
            fake.expire("status")
            async with s.get(pods, params={"watch": "1", "resourceVersion": rv}) as r:
                assert r.status == 410 and (await r.json())["reason"] == "Expired"
            async with s.get(pods + "/a") as r:
                assert r.status == 200 and (await r.json())["status"]["podIP"] == "127.0.0.2"
            async with s.get(pods + "/nope") as r:
                assert r.status == 404 and (await r.json())["kind"] == "Status"
            async with s.get(pods, params={"fieldSelector": "spec.nodeName=x"}) as r:
                assert r.status == 400
    finally:
        await asyncio.to_thread(fake.stop)


async def test_a_410_after_every_list_backs_off_instead_of_spinning(
    k8s: FakeKube, discover: Callable[..., Any]
) -> None:
    k8s.add_pod("a", "127.0.0.2", {"app": "vllm"})
    _, changes = await discover(selector={"app": "vllm"}, ports=[8000])
    await until(lambda: changes.last == urls("127.0.0.2"), "initial list")

    def always_gone(s: Any) -> None:  # a server whose lists are older than its compaction
        s.compacted = 10**9
        s.drop_watches()

    k8s.do(always_gone)
    lists = k8s.requests("list", PODS)
    await until(lambda: k8s.requests("list", PODS) >= lists + 3, "relists")
    t0 = time.monotonic()
    await until(lambda: k8s.requests("list", PODS) >= lists + 6, "more relists")
    assert time.monotonic() - t0 >= FAST.max_backoff  # paced by the backoff (a spin takes ms)
    assert changes.last == urls("127.0.0.2")
    k8s.do(lambda s: setattr(s, "compacted", 0))
    k8s.add_pod("b", "127.0.0.3", {"app": "vllm"})
    await until(lambda: changes.last == urls("127.0.0.2", "127.0.0.3"), "back to normal")


def test_the_cli_exits_2_without_credentials(
    no_cluster: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main

    argv = [
        "serve",
        "--k8s-selector",
        "app=vllm",
        "--k8s-target-port",
        "8000",
        "--grpc-address",
        "127.0.0.1:0",
        "--admin-address",
        "127.0.0.1:0",
    ]
    assert main(argv) == 2
    assert "Kubernetes discovery needs credentials" in capsys.readouterr().err
