"""A small fake Kubernetes API server for the discovery tests (plain HTTP on loopback).

It speaks the documented list/watch wire protocol for the two collections the service reads:

* pods: ``GET /api/v1/namespaces/{ns}/pods[/{name}]``
* InferencePools: ``GET /apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools[/{name}]``

Lists answer ``{"kind": "...List", "metadata": {"resourceVersion"}, "items"}`` filtered by
``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``) and ``fieldSelector``
(``metadata.name``, ``metadata.namespace``). ``watch=true`` streams newline-delimited JSON
events ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`` from
``resourceVersion`` on (none or "0": the current objects as ADDED first), honours
``timeoutSeconds`` and ``allowWatchBookmarks``, and turns an object that starts or stops
matching the selector into ADDED / DELETED, as the real watch cache does. A watch from a
version older than the last compaction (:meth:`KubeState.expire`) gets ``410 Gone``, as a
watch ERROR event or as the HTTP status.

It runs its own event loop in a thread, so tests (sync or async) and child processes can use it
while the test's own loop is busy. Controls (:class:`FakeKube`): add / modify / delete pods,
create / change / delete a pool, expire versions (410), an outage (``503``, ``refused``,
``hang``) and recovery; ``requests`` records what clients asked.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from aiohttp import web

POOL_API = "inference.networking.k8s.io/v1"
PODS, POOLS = "pods", "inferencepools"
_KIND = {PODS: ("Pod", "v1"), POOLS: ("InferencePool", POOL_API)}

T = TypeVar("T")
Outage = Literal["503", "refused", "hang"]


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """``k=v``, ``k==v``, ``k!=v``, ``k`` (exists), ``!k`` (absent), comma = and."""
    terms: list[tuple[str, str, str]] = []  # (op, key, value)
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in raw:
            k, v = (p.strip() for p in raw.split("!=", 1))
            terms.append(("!=", k, v))
        elif "=" in raw:
            k, v = (p.strip() for p in raw.replace("==", "=").split("=", 1))
            terms.append(("=", k, v))
        elif raw.startswith("!"):
            terms.append(("absent", raw[1:], ""))
        else:
            terms.append(("exists", raw, ""))

    def matches(labels: Mapping[str, str]) -> bool:
        for op, k, v in terms:
            ok = {
                "=": labels.get(k) == v,
                "!=": labels.get(k) != v,
                "absent": k not in labels,
                "exists": k in labels,
            }[op]
            if not ok:
                return False
        return True

    return matches


def parse_field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    wanted: dict[str, str] = {}
    for raw in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = raw.replace("==", "=").partition("=")
        if key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {key}")
        wanted[key.split(".", 1)[1]] = value
    return lambda meta: all(meta.get(k) == v for k, v in wanted.items())


@dataclass
class Event:
    rv: int
    resource: str
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None


class KubeState:
    """Objects, their history and the watchers; every method runs on the server's loop."""

    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[Event] = []
        self.compacted = 0  # watches from an older version get 410
        self.gone_as: Literal["event", "status"] = "event"
        self.generation = 0  # bumped to end every open watch
        self.changed = asyncio.Event()
        self.outage: Outage | None = None
        self.recovered = asyncio.Event()
        self.requests: list[tuple[str, str, str]] = []  # (verb, resource, query string)
        self.open_watches = 0

    # -- mutations (each one is one resourceVersion)

    def _commit(self, resource: str, ns: str, name: str, obj: dict[str, Any] | None) -> None:
        key = (resource, ns, name)
        prev = self.objects.get(key)
        self.rv += 1
        if obj is None:
            if prev is None:
                raise KeyError(f"{resource} {ns}/{name} does not exist")
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            del self.objects[key]
            self.history.append(Event(self.rv, resource, ns, "DELETED", gone, prev))
        else:
            obj = copy.deepcopy(obj)
            obj["metadata"].update(name=name, namespace=ns, resourceVersion=str(self.rv))
            obj["metadata"].setdefault("uid", f"uid-{resource}-{ns}-{name}")
            self.objects[key] = obj
            self.history.append(
                Event(self.rv, resource, ns, "MODIFIED" if prev else "ADDED", obj, prev)
            )
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def get(self, resource: str, name: str, ns: str = "default") -> dict[str, Any]:
        return copy.deepcopy(self.objects[(resource, ns, name)])

    def add_pod(
        self,
        name: str,
        ip: str,
        labels: Mapping[str, str],
        *,
        ready: bool = True,
        ns: str = "default",
        port: int = 8000,
    ) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"labels": dict(labels), "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "containers": [
                    {
                        "name": "vllm",
                        "image": "vllm/vllm-openai",
                        "ports": [{"containerPort": port, "protocol": "TCP"}],
                    }
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
        self._commit(PODS, ns, name, pod)

    def set_pod_ready(self, name: str, ready: bool, ns: str = "default") -> None:
        pod = self.get(PODS, name, ns)
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self._commit(PODS, ns, name, pod)

    def set_pod_labels(self, name: str, labels: Mapping[str, str], ns: str = "default") -> None:
        pod = self.get(PODS, name, ns)
        pod["metadata"]["labels"] = dict(labels)
        self._commit(PODS, ns, name, pod)

    def terminate_pod(self, name: str, ns: str = "default") -> None:
        """Deletion requested: deletionTimestamp set, the pod still Ready for its grace period."""
        pod = self.get(PODS, name, ns)
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        self._commit(PODS, ns, name, pod)

    def delete_pod(self, name: str, ns: str = "default") -> None:
        self._commit(PODS, ns, name, None)

    def set_pool(
        self,
        name: str,
        match_labels: Mapping[str, str],
        ports: Sequence[int],
        ns: str = "default",
        spec: dict[str, Any] | None = None,
    ) -> None:
        pool = {
            "apiVersion": POOL_API,
            "kind": "InferencePool",
            "metadata": {},
            "spec": spec
            if spec is not None
            else {
                "selector": {"matchLabels": dict(match_labels)},
                "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": "extproc", "port": {"number": 9002}},
            },
        }
        self._commit(POOLS, ns, name, pool)

    def delete_pool(self, name: str, ns: str = "default") -> None:
        self._commit(POOLS, ns, name, None)

    def expire(self, how: Literal["event", "status"] = "event") -> None:
        """Compaction: history up to now is gone and open watches end, so clients watch again
        from their last version, which is now too old: 410 Gone (as ``how`` says)."""
        self.rv += 1
        self.compacted = self.rv
        self.history.clear()
        self.gone_as = how
        self.drop_watches()

    def drop_watches(self) -> None:
        self.generation += 1
        self._wake()


def kind_list(resource: str) -> tuple[str, str]:
    kind, api = _KIND[resource]
    return f"{kind}List", api


class FakeKube:
    """The server in a thread. ``with FakeKube() as k8s: k8s.add_pod(...)``."""

    def __init__(self, host: str = "127.0.0.1", *, bookmark_interval: float = 1.0) -> None:
        self.host = host
        self.port = 0
        self.bookmark_interval = bookmark_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._state: KubeState | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle

    def start(self, *, listening: bool = True) -> FakeKube:
        """Start the server; ``listening=False`` starts it in a ``refused`` outage (port reserved)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self._main(ready, listening))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                ready.set()

        self._thread = threading.Thread(target=main, name="fake-k8s", daemon=True)
        self._thread.start()
        if not ready.wait(10) or errors:
            raise RuntimeError(f"fake Kubernetes API did not start: {errors}")
        return self

    async def _main(self, ready: threading.Event, listening: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._state = KubeState()
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._collection(PODS))
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._one(PODS))
        base = f"/apis/{POOL_API}/namespaces/{{ns}}/inferencepools"
        app.router.add_get(base, self._collection(POOLS))
        app.router.add_get(base + "/{name}", self._one(POOLS))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()
        if not listening:
            await self._unlisten()
            self._state.outage = "refused"
        ready.set()
        await self._stopping.wait()
        self._state.drop_watches()
        self._state.recovered.set()
        await self._runner.cleanup()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if not self.port:  # bound to port 0: keep the kernel's pick for restarts after "refused"
            self.port = int(self._runner.addresses[0][1])

    async def _unlisten(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str | None = "default") -> Path:
        context: dict[str, Any] = {"cluster": "fake", "user": "fake"}
        if namespace:
            context["namespace"] = namespace
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [{"name": "fake", "context": context}],
                }
            )
        )
        return path

    # -- controls (thread-safe)

    def do(self, fn: Callable[[KubeState], T]) -> T:
        """Run ``fn(state)`` on the server's loop, in one step (atomic for watchers)."""
        assert self._loop is not None and self._state is not None
        state = self._state

        async def call() -> T:
            return fn(state)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def add_pod(self, name: str, ip: str, labels: Mapping[str, str], **kw: Any) -> None:
        self.do(lambda s: s.add_pod(name, ip, labels, **kw))

    def set_pod_ready(self, name: str, ready: bool, ns: str = "default") -> None:
        self.do(lambda s: s.set_pod_ready(name, ready, ns))

    def set_pod_labels(self, name: str, labels: Mapping[str, str], ns: str = "default") -> None:
        self.do(lambda s: s.set_pod_labels(name, labels, ns))

    def terminate_pod(self, name: str, ns: str = "default") -> None:
        self.do(lambda s: s.terminate_pod(name, ns))

    def delete_pod(self, name: str, ns: str = "default") -> None:
        self.do(lambda s: s.delete_pod(name, ns))

    def set_pool(
        self, name: str, match_labels: Mapping[str, str], ports: Sequence[int], **kw: Any
    ) -> None:
        self.do(lambda s: s.set_pool(name, match_labels, ports, **kw))

    def delete_pool(self, name: str, ns: str = "default") -> None:
        self.do(lambda s: s.delete_pool(name, ns))

    def expire(self, how: Literal["event", "status"] = "event") -> None:
        self.do(lambda s: s.expire(how))

    def outage(self, mode: Outage) -> None:
        """The API goes away: every request answers 503, or is refused, or hangs; open watches end."""
        assert self._loop is not None

        async def go() -> None:
            state = self._state
            assert state is not None
            if mode == "refused":  # stop listening first: reconnecting watches are refused
                await self._unlisten()
            state.recovered = asyncio.Event()
            state.outage = mode
            state.drop_watches()

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def recover(self) -> None:
        assert self._loop is not None

        async def go() -> None:
            state = self._state
            assert state is not None
            if state.outage == "refused":
                await self._listen()
            state.outage = None
            state.recovered.set()

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def requests(self, verb: str | None = None, resource: str | None = None) -> int:
        """How many requests of this verb (list, watch, get) and resource were received."""
        return self.do(
            lambda s: sum(
                1
                for v, r, _ in s.requests
                if (verb is None or v == verb) and (resource is None or r == resource)
            )
        )

    def open_watches(self) -> int:
        return self.do(lambda s: s.open_watches)

    # -- HTTP side

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        state = self._state
        assert state is not None
        parts = request.path.strip("/").split("/")
        resource = PODS if PODS in parts else POOLS if POOLS in parts else "?"
        named = parts[-1] not in (PODS, POOLS)
        watch = request.query.get("watch", "") in ("true", "1")
        verb = "watch" if watch else "get" if named else "list"
        state.requests.append((verb, resource, request.query_string))
        if state.outage == "hang":
            await state.recovered.wait()
        if state.outage is not None:
            return web.json_response(
                status(503, "ServiceUnavailable", "the fake API is down"), status=503
            )
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return web.json_response(
                status(404, "NotFound", f"no route {request.path}"), status=404
            )
        return response

    def _one(self, resource: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            state = self._state
            assert state is not None
            ns, name = request.match_info["ns"], request.match_info["name"]
            obj = state.objects.get((resource, ns, name))
            if obj is None:
                return web.json_response(
                    status(404, "NotFound", f'{resource} "{name}" not found'), status=404
                )
            return web.json_response(obj)

        return handler

    def _collection(self, resource: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            state = self._state
            assert state is not None
            ns = request.match_info["ns"]
            try:
                labels_ok = parse_label_selector(request.query.get("labelSelector", ""))
                fields_ok = parse_field_selector(request.query.get("fieldSelector", ""))
            except ValueError as exc:
                return web.json_response(status(400, "BadRequest", str(exc)), status=400)

            def matches(obj: dict[str, Any] | None) -> bool:
                if obj is None:
                    return False
                meta = obj["metadata"]
                return labels_ok(meta.get("labels") or {}) and fields_ok(meta)

            if request.query.get("watch", "") in ("true", "1"):
                return await self._watch(request, resource, ns, matches)
            items = [
                copy.deepcopy(o)
                for (r, n, _), o in sorted(state.objects.items())
                if r == resource and n == ns and matches(o)
            ]
            kind, api = kind_list(resource)
            return web.json_response(
                {
                    "kind": kind,
                    "apiVersion": api,
                    "metadata": {"resourceVersion": str(state.rv)},
                    "items": items,
                }
            )

        return handler

    async def _watch(
        self,
        request: web.Request,
        resource: str,
        ns: str,
        matches: Callable[[dict[str, Any] | None], bool],
    ) -> web.StreamResponse:
        state = self._state
        assert state is not None
        since = request.query.get("resourceVersion", "")
        if since not in ("", "0") and int(since) < state.compacted:
            gone = status(410, "Expired", f"too old resource version: {since} ({state.compacted})")
            if state.gone_as == "status":
                return web.json_response(gone, status=410)
        else:
            gone = None
        timeout = float(request.query.get("timeoutSeconds", "0") or 0)
        bookmarks = request.query.get("allowWatchBookmarks", "") in ("true", "1")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if gone is not None:  # the API server's way: a 200 stream with one ERROR event
            await send("ERROR", gone)
            await response.write_eof()
            return response
        generation = state.generation
        if since in ("", "0"):
            for (r, n, _), obj in sorted(state.objects.items()):
                if r == resource and n == ns and matches(obj):
                    await send("ADDED", obj)
            cursor = state.rv
        else:
            cursor = int(since)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        last_sent = loop.time()
        state.open_watches += 1
        try:
            while True:
                pending = [e for e in state.history if e.rv > cursor]
                for ev in pending:
                    cursor = ev.rv
                    if ev.resource != resource or ev.namespace != ns:
                        continue
                    was, now = matches(ev.prev), matches(ev.obj if ev.type != "DELETED" else None)
                    if ev.type == "DELETED" and was:
                        await send("DELETED", ev.obj)
                    elif was and now:
                        await send(ev.type, ev.obj)
                    elif now:
                        await send("ADDED", ev.obj)
                    elif was:  # stopped matching the selector: gone for this watch
                        await send("DELETED", ev.obj)
                    else:
                        continue
                    last_sent = loop.time()
                if state.generation != generation or state.outage is not None:
                    break
                if pending:
                    continue  # sending yielded to the loop: changes made meanwhile come first
                waits = [self.bookmark_interval - (loop.time() - last_sent)] if bookmarks else []
                if deadline is not None:
                    waits.append(deadline - loop.time())
                wait = min(waits) if waits else None
                if wait is not None and wait <= 0:
                    if deadline is not None and loop.time() >= deadline:
                        break
                    kind, api = _KIND[resource]
                    await send(
                        "BOOKMARK",
                        {
                            "kind": kind,
                            "apiVersion": api,
                            "metadata": {"resourceVersion": str(max(cursor, state.compacted))},
                        },
                    )
                    last_sent = loop.time()
                    continue
                try:
                    await asyncio.wait_for(state.changed.wait(), wait)
                except TimeoutError:
                    pass
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            state.open_watches -= 1
        return response
