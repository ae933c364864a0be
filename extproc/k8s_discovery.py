"""Backends from Kubernetes: the Ready pods of an InferencePool, or of a label selector.

``--k8s-inference-pool NAME`` follows the InferencePool ``inference.networking.k8s.io/v1`` NAME
(its ``spec.selector.matchLabels`` and ``spec.targetPorts[].number``) and the pods it selects;
``--k8s-selector 'app=vllm' --k8s-target-port 8000`` follows pods without a pool. Backends are
the pods that are Ready, not terminating and have an IP, times the target ports.

Each collection is kept with the API's list/watch protocol (``_ListWatch``): list, then watch
from the list's resourceVersion; a watch is reopened from the last version seen (a window
bounds every watch, so a half-open connection cannot freeze the view); ``410 Gone`` (as an HTTP
status or as a watch ERROR event) means that version is too old: list again. Errors back off
exponentially (capped, jittered), and the last good set of backends is kept meanwhile: an
unreachable API never empties the pool. A deleted InferencePool does (it is logged).

``synced`` is set after the first complete view (pool read and its pods listed): readiness
waits for it, so a replica is not marked ready before it knows the pool.

The client is lightkube (async, typed, small): see docs/kubernetes.md for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import msgspec
from lightkube import AsyncClient, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ApiError, NotReadyError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from extproc.config import ConfigError, Settings
from extproc.supervise import spawn

log = logging.getLogger(__name__)

InferencePool = create_namespaced_resource(
    "inference.networking.k8s.io", "v1", "InferencePool", "inferencepools"
)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = Path("~/.kube/config")

# Kubernetes label syntax: an optional DNS-subdomain prefix and a name; values <= 63 chars.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


# ------------------------------------------------------------------ pure parts


def parse_selector(text: str) -> dict[str, str]:
    """``'app=vllm,tier=x'`` → ``{'app': 'vllm', 'tier': 'x'}``: equality terms only, like an
    InferencePool's ``matchLabels`` (``==`` is accepted as ``=``)."""
    labels: dict[str, str] = {}
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        key, sep, value = term.replace("==", "=").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or "!" in key or "=" in value:
            raise ValueError(f"--k8s-selector terms are key=value, got {term!r}")
        if not _LABEL_KEY.match(key):
            raise ValueError(f"--k8s-selector: {key!r} is not a valid label key")
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"--k8s-selector: {value!r} (label {key}) is not a valid label value")
        if labels.get(key, value) != value:
            raise ValueError(f"--k8s-selector names label {key!r} twice with different values")
        labels[key] = value
    if not labels:
        raise ValueError("--k8s-selector is empty; give key=value[,key=value...]")
    return labels


def parse_ports(values: Iterable[int | str]) -> list[int]:
    """Ports from repeated flags and/or comma lists: ``['8000,8001', 9000]`` → ``[8000, 8001, 9000]``."""
    ports: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                raise ValueError(f"--k8s-target-port expects port numbers 1-65535, got {part!r}")
            ports.append(int(part))
    return sorted(set(ports))


@dataclass(frozen=True)
class Target:
    """Which pods (labels to match) and which of their ports are backends."""

    labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]

    @classmethod
    def of(cls, labels: Mapping[str, str], ports: Iterable[int]) -> Target:
        return cls(tuple(sorted(labels.items())), tuple(sorted(set(ports))))

    @property
    def selector(self) -> dict[str, str]:
        return dict(self.labels)

    def describe_labels(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels)

    def describe(self) -> str:
        return f"pods {self.describe_labels()} port(s) {','.join(map(str, self.ports))}"


def pool_target(pool: Mapping[str, Any]) -> Target:
    """The Target of an InferencePool object (a dict); ValueError says what is wrong with it."""
    spec = pool.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not labels:
        # An empty selector would select every pod of the namespace: refuse it.
        raise ValueError("spec.selector.matchLabels is missing or empty")
    ports = []
    for entry in spec.get("targetPorts") or []:
        number = entry.get("number") if isinstance(entry, Mapping) else None
        if not isinstance(number, int) or not 1 <= number <= 65535:
            raise ValueError(f"spec.targetPorts has an invalid entry {entry!r}")
        ports.append(number)
    if not ports:
        raise ValueError("spec.targetPorts is missing or empty")
    return Target.of({str(k): str(v) for k, v in labels.items()}, ports)


def pod_is_ready(pod: Pod) -> bool:
    """Ready=True, not terminating, with an IP: what an EndpointSlice would call ready."""
    if pod.metadata is None or pod.metadata.deletionTimestamp is not None:
        return False
    status = pod.status
    if status is None or not status.podIP:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())


def backend_url(ip: str, port: int) -> str:
    return (
        f"http://[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"http://{ip}:{port}"
    )


def pod_endpoints(
    pods: Iterable[Pod], labels: Mapping[str, str], ports: Iterable[int]
) -> list[str]:
    """Backend URLs of the ready pods matching ``labels``, times ``ports``; sorted, no duplicates."""
    port_list = sorted(set(ports))
    urls: set[str] = set()
    for pod in pods:
        pod_labels = (pod.metadata.labels if pod.metadata else None) or {}
        if not pod_is_ready(pod) or any(pod_labels.get(k) != v for k, v in labels.items()):
            continue
        assert pod.status is not None and pod.status.podIP  # pod_is_ready checked both
        try:
            urls.update(backend_url(pod.status.podIP, port) for port in port_list)
        except ValueError:
            log.warning(
                "pod %s has an unparsable IP %r; skipped",
                pod.metadata.name if pod.metadata else "?",
                pod.status.podIP,
            )
    return sorted(urls)


def default_namespace(config: SingleConfig, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    """The pod's own namespace (service account), else the kubeconfig context's, else default."""
    try:
        own = (sa_dir / "namespace").read_text().strip()
    except OSError:
        own = ""
    return own or config.namespace or "default"


def load_kube_config(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> SingleConfig:
    """Credentials, in controller-runtime's order: ``$KUBECONFIG``, in-cluster service account,
    ``~/.kube/config``. A problem is a ConfigError with a readable message."""
    env_path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    in_cluster = (sa_dir / "token").is_file() and "KUBERNETES_SERVICE_HOST" in os.environ
    home = DEFAULT_KUBECONFIG.expanduser()
    try:
        if env_path:
            source, kube = f"KUBECONFIG={env_path}", KubeConfig.from_file(env_path)
        elif in_cluster:
            source, kube = "in-cluster service account", KubeConfig.from_service_account(sa_dir)
        elif home.is_file():
            source, kube = str(home), KubeConfig.from_file(home)
        else:
            raise ConfigError(
                "Kubernetes discovery needs credentials: run in a pod with a service account, "
                f"or set KUBECONFIG, or provide {home}"
            )
        config = kube.get()  # the current context (raises without one)
        assert config is not None
    except (LightkubeConfigError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot load Kubernetes credentials: {exc}") from exc
    log.info("kubernetes: credentials from %s, API server %s", source, config.cluster.server)
    return config


# ------------------------------------------------------------------ list/watch machinery


class Backoff:
    """Exponential backoff with jitter (half to full of the current step), capped."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempts = 0

    def next(self) -> float:
        step = min(self.cap, self.base * 2**self.attempts)
        self.attempts += 1
        return step * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempts = 0


# What a failing or unreachable API raises (HTTP statuses, transport errors, undecodable
# replies). Anything else is a bug: it reaches supervise.spawn and is counted as a task error.
API_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, OSError, msgspec.MsgspecError)


def status_code(exc: BaseException) -> int | None:
    """The HTTP / Status code of an API error: a watch ERROR event carries it in its object."""
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.code:
        return int(exc.status.code)
    response = getattr(exc, "response", None)
    return int(response.status_code) if response is not None else None


def describe_error(exc: BaseException) -> str:
    code = status_code(exc)
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.message:
        text = exc.status.message
    elif isinstance(exc, httpx.HTTPStatusError):
        text = exc.response.reason_phrase
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if code in (401, 403):
        text += " (the service account needs get/list/watch on pods and inferencepools: docs/kubernetes.md)"
    return f"HTTP {code} {text}" if code else text


@dataclass
class WatchTiming:
    watch_seconds: float = (
        60.0  # every watch is reopened after this long (server timeoutSeconds too)
    )
    backoff: float = 0.5  # first retry delay after an error
    max_backoff: float = 30.0


class _ListWatch:
    """Keep one collection (pods of a selector, or one pool) in sync with list + watch."""

    def __init__(
        self,
        client: AsyncClient,
        res: Any,
        *,
        namespace: str,
        what: str,
        on_list: Callable[[dict[str, Any]], None],
        on_event: Callable[[str, Any], None],
        timing: WatchTiming,
        rng: random.Random,
        labels: Mapping[str, str] | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        self.client, self.res, self.namespace, self.what = client, res, namespace, what
        self.on_list, self.on_event = on_list, on_event
        self.labels: dict[str, Any] | None = dict(labels) if labels else None
        self.fields: dict[str, Any] | None = dict(fields) if fields else None
        self.timing = timing
        self.backoff = Backoff(timing.backoff, timing.max_backoff, rng)
        self.rng = rng
        self.version: str | None = None  # last resourceVersion seen; None = list first
        self.failures = 0  # consecutive
        self.gone = 0  # 410s since the last watch event

    async def run(self) -> None:
        # Every (re)start lists first: a restart after a crash must not skip the event it crashed on.
        self.version = None
        while True:
            try:
                if self.version is None:
                    await self._list()
                await self._watch()
            except API_ERRORS as exc:
                if status_code(exc) == 410:  # an HTTP status or a watch ERROR event: too old
                    log.info(
                        "kubernetes: %s: resourceVersion %s expired (410 Gone); listing again",
                        self.what,
                        self.version,
                    )
                    self.version = None
                    self.gone += 1
                    if self.gone > 1:  # Gone again right after a list: do not spin on it
                        await asyncio.sleep(self.backoff.next())
                    continue
                self.failures += 1
                delay = self.backoff.next()
                log.warning(
                    "kubernetes: %s failed (%d in a row): %s; keeping the last known backends, "
                    "retrying in %.1f s",
                    self.what,
                    self.failures,
                    describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    def _recovered(self) -> None:
        if self.failures:
            log.info(
                "kubernetes: %s: API answers again after %d failure(s)", self.what, self.failures
            )
        self.failures = 0
        if not self.gone:  # a list that keeps ending in 410 is no recovery
            self.backoff.reset()

    async def _list(self) -> None:
        listing = self.client.list(
            self.res, namespace=self.namespace, labels=self.labels, fields=self.fields
        )
        items: dict[str, Any] = {}
        async for obj in listing:
            items[obj.metadata.name] = obj
        try:
            self.version = listing.resourceVersion
        except NotReadyError:  # a reply without metadata.resourceVersion: watch from "any"
            self.version = "0"
        self._recovered()
        self.on_list(items)

    async def _watch(self) -> None:
        # The window also bounds a watch whose connection went half-open (no FIN, no events).
        window = self.timing.watch_seconds * self.rng.uniform(0.9, 1.0)
        server_timeout = max(1, int(window))
        events: AsyncIterable[tuple[str, Any]] = self.client.watch(
            self.res,
            namespace=self.namespace,
            labels=self.labels,
            fields=self.fields,
            server_timeout=server_timeout,
            resource_version=self.version,
        )
        try:
            async with asyncio.timeout(window + 1.0), contextlib.aclosing(events):  # type: ignore[type-var]
                async for kind, obj in events:
                    self.gone = 0
                    self._recovered()
                    version = obj.metadata.resourceVersion if obj.metadata else None
                    if version:
                        self.version = version
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.on_event(kind, obj)
        except TimeoutError:
            pass  # window over: reopen from self.version (not an error)


# ------------------------------------------------------------------ discovery


class K8sDiscovery:
    """Same shape as :class:`extproc.discovery.Discovery`: ``start``/``stop``, ``on_change``
    with the full backend list on every change, ``synced`` once the first view is complete."""

    def __init__(
        self,
        client: AsyncClient,
        on_change: Callable[[list[str]], None],
        *,
        namespace: str,
        pool: str = "",
        selector: Mapping[str, str] | None = None,
        ports: Sequence[int] = (),
        on_error: Callable[[str], None] = lambda task: None,
        timing: WatchTiming | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if bool(pool) == bool(selector):
            raise ValueError("give exactly one of pool or selector")
        if selector and not ports:
            raise ValueError("a selector needs target ports")
        self.client = client
        self.on_change = on_change
        self.namespace = namespace
        self.pool = pool
        self.on_error = on_error
        self.timing = timing or WatchTiming()
        self.rng = rng or random.Random()
        self.synced = asyncio.Event()
        # Current wish (from the flags or the pool) and the pods listed for _pods_target's labels.
        self._target: Target | None = Target.of(selector, ports) if selector else None
        self._pool_known = not pool
        self._pods: dict[str, Pod] = {}
        self._pods_target: Target | None = None
        self._pods_task: asyncio.Task[None] | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self._published: list[str] | None = None
        self.pods_watch: _ListWatch | None = None
        self.pool_watch: _ListWatch | None = None

    async def start(self) -> None:
        """Returns at once: the API may be unreachable now; ``synced`` tells when it was read."""
        what = (
            f"InferencePool {self.pool}"
            if self.pool or self._target is None
            else self._target.describe()
        )
        log.info("kubernetes discovery: %s in namespace %s", what, self.namespace)
        if self.pool:
            self.pool_watch = _ListWatch(
                self.client,
                InferencePool,
                namespace=self.namespace,
                what=f"InferencePool {self.pool}",
                fields={"metadata.name": self.pool},
                on_list=self._pool_listed,
                on_event=self._pool_event,
                timing=self.timing,
                rng=self.rng,
            )
            self._pool_task = spawn("k8s-pool-watch", self.pool_watch.run, self.on_error)
        else:
            self._follow_pods()

    async def stop(self) -> None:
        for task in (self._pool_task, self._pods_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.client.close()

    def current(self) -> list[str]:
        return list(self._published or [])

    @property
    def target(self) -> Target | None:
        return self._target

    # -- pool

    def _pool_listed(self, items: dict[str, Any]) -> None:
        self._set_pool(items.get(self.pool))

    def _pool_event(self, kind: str, obj: Any) -> None:
        if obj.metadata is None or obj.metadata.name != self.pool:
            return
        self._set_pool(None if kind == "DELETED" else obj)

    def _set_pool(self, pool: Mapping[str, Any] | None) -> None:
        self._pool_known = True
        target: Target | None = None
        if pool is None:
            if self._target is not None or not self.synced.is_set():
                log.warning(
                    "kubernetes: InferencePool %s/%s does not exist (deleted?): no backends",
                    self.namespace,
                    self.pool,
                )
        else:
            try:
                target = pool_target(pool)
            except ValueError as exc:
                log.error(
                    "kubernetes: InferencePool %s/%s is unusable: %s; no backends",
                    self.namespace,
                    self.pool,
                    exc,
                )
        if target == self._target and (target is None or self._pods_task is not None):
            self._maybe_synced()
            return
        old, self._target = self._target, target
        if target is None:
            self._stop_pods()
            self._pods, self._pods_target = {}, None
            self._publish()
        elif old is not None and old.labels == target.labels and self._pods_task is not None:
            log.info(
                "kubernetes: InferencePool %s: target ports now %s", self.pool, list(target.ports)
            )
            self._publish()  # same pods, other ports: no new list needed
        else:
            log.info("kubernetes: InferencePool %s selects %s", self.pool, target.describe())
            self._follow_pods()  # new selector: list its pods (the old set stays until then)

    # -- pods

    def _follow_pods(self) -> None:
        assert self._target is not None
        self._stop_pods()
        target = self._target
        self.pods_watch = _ListWatch(
            self.client,
            Pod,
            namespace=self.namespace,
            what=f"pods {target.describe_labels()}",
            labels=target.selector,
            on_list=lambda pods: self._pods_listed(target, pods),
            on_event=self._pod_event,
            timing=self.timing,
            rng=self.rng,
        )
        self._pods_task = spawn("k8s-pods-watch", self.pods_watch.run, self.on_error)

    def _stop_pods(self) -> None:
        if self._pods_task is not None:
            self._pods_task.cancel()  # its client calls end with it; nothing else to await
            self._pods_task = None

    def _pods_listed(self, target: Target, pods: dict[str, Pod]) -> None:
        self._pods, self._pods_target = pods, target
        self._publish()

    def _pod_event(self, kind: str, pod: Pod) -> None:
        name = pod.metadata.name if pod.metadata else None
        if not name:
            return
        if kind == "DELETED":
            self._pods.pop(name, None)
        else:
            self._pods[name] = pod
        self._publish()

    # -- output

    def _ready_to_publish(self) -> bool:
        if not self._pool_known:
            return False
        return self._target is None or self._pods_target is not None

    def _publish(self) -> None:
        if not self._ready_to_publish():
            return
        if self._target is None or self._pods_target is None:
            urls: list[str] = []
        else:
            # Labels the pods were listed for, ports wished now (a port change needs no list).
            urls = pod_endpoints(
                self._pods.values(), self._pods_target.selector, self._target.ports
            )
        if urls != self._published:
            self._published = urls
            self.on_change(urls)
        self._maybe_synced()

    def _maybe_synced(self) -> None:
        if not self.synced.is_set() and self._ready_to_publish():
            if self._published is None:
                self._published = []
                self.on_change([])
            log.info("kubernetes discovery synced: %d backend(s)", len(self._published))
            self.synced.set()


def build_k8s_discovery(
    settings: Settings,
    on_change: Callable[[list[str]], None],
    *,
    on_error: Callable[[str], None] = lambda task: None,
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
    timing: WatchTiming | None = None,
) -> K8sDiscovery:
    """From the settings (``k8s_*`` flags). Credentials are read now: a problem is a ConfigError."""
    config = load_kube_config(sa_dir)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # it logs every API request at INFO
    namespace = settings.k8s_namespace or default_namespace(config, sa_dir)
    client = AsyncClient(config=config, namespace=namespace, timeout=httpx.Timeout(10.0))
    return K8sDiscovery(
        client,
        on_change,
        namespace=namespace,
        pool=settings.k8s_inference_pool,
        selector=parse_selector(settings.k8s_selector) if settings.k8s_selector else None,
        ports=settings.k8s_target_port,
        on_error=on_error,
        timing=timing,
    )
