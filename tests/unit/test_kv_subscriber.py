"""KV-event subscriptions over real ZMQ sockets on loopback (tcp://127.0.0.1 and ipc://)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq
from prometheus_client import CollectorRegistry

from extproc.kv_index import KvIndex, chain_hashes, root_hash
from extproc.kv_metrics import KvMetrics
from extproc.kv_subscriber import KvEventSubscriptions, parse_endpoint_map
from vllmsim.kv_events import KvEventPublisher, KvEventsSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kv_events"
TOKENS = list(range(1, 33))  # 2 blocks of 16


def free_port() -> int:
    from devstack.processes import free_port as pick

    return pick()


async def until(check, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def joined(
    pub: KvEventPublisher, index: KvIndex, endpoint: str, timeout: float = 5.0
) -> None:
    """ZMQ's slow joiner: publish harmless clears until the subscriber has one."""
    deadline = time.monotonic() + timeout
    server = index.servers[endpoint]
    while server.batches == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{endpoint} never received an event")
        pub.publish([("cleared",)])
        await asyncio.sleep(0.02)


def stored(hashes, tokens, parent=None):
    return ("stored", hashes, parent, tokens, 16, None, None)


def held(index: KvIndex, endpoint: str, tokens=TOKENS) -> int:
    server = index.servers[endpoint]
    return server.matched_blocks(chain_hashes(tokens, 16, root_hash(None)))


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


@pytest.fixture
def parts():
    registry = CollectorRegistry()
    metrics = KvMetrics(registry)
    index = KvIndex(max_blocks=1000)
    metrics.attach_index(index)
    return index, metrics, registry


async def test_port_and_explicit_endpoints_follow_discovery(tmp_path, parts):
    index, metrics, registry = parts
    port = free_port()
    ipc = f"ipc://{tmp_path}/kv-b"
    a, b, silent = "127.0.0.1:8000", "127.0.0.1:9001", "127.0.0.2:8000"
    pub_a = KvEventPublisher(KvEventsSettings(f"tcp://127.0.0.1:{port}"))
    pub_b = KvEventPublisher(KvEventsSettings(ipc))
    subs = KvEventSubscriptions(index, metrics, port=port, endpoints={b: ipc})
    try:
        subs.sync([a, b, silent])
        assert subs.addresses == {
            a: f"tcp://127.0.0.1:{port}",
            b: ipc,
            silent: f"tcp://127.0.0.2:{port}",
        }
        await joined(pub_a, index, a)
        await joined(pub_b, index, b)
        pub_a.publish([stored([11, 12], TOKENS)])
        pub_b.publish([stored([21], TOKENS[:16])])
        await until(lambda: held(index, a) == 2 and held(index, b) == 1, what="stores applied")
        pub_a.publish([("removed", 12)])
        await until(lambda: held(index, a) == 1, what="removal applied")
        assert index.get(silent) is None  # subscribed, silent: approximate
        assert sample(registry, "extproc_kv_events_total", backend=a, type="BlockStored") == 1
        assert sample(registry, "extproc_kv_events_total", backend=a, type="BlockRemoved") == 1
        assert sample(registry, "extproc_kv_index_blocks", backend=a) == 1
        assert sample(registry, "extproc_kv_index_block_size", backend=b) == 16
        # b leaves the pool: its subscription, index and series go
        subs.sync([a, silent])
        assert b not in index.servers and b not in subs.addresses
        assert (
            sample(registry, "extproc_kv_events_total", backend=b, type="AllBlocksCleared") is None
        )
        pub_b.publish([stored([22], TOKENS[:16])])  # nobody listens any more
        await asyncio.sleep(0.05)
        assert b not in index.servers
    finally:
        await subs.stop()
        pub_a.close()
        pub_b.close()
    assert not index.servers


async def test_vllm_frames_gaps_and_garbage_over_the_wire(tmp_path, parts):
    index, metrics, registry = parts
    address = f"ipc://{tmp_path}/kv-raw"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(address)
    ep = "127.0.0.1:8000"
    subs = KvEventSubscriptions(index, metrics, endpoints={ep: address})
    payload = (FIXTURES / "stored.msgpack").read_bytes()  # encoded by vLLM's own classes
    try:
        subs.sync([ep])
        server = index.servers[ep]
        seq = 0
        deadline = time.monotonic() + 5
        while server.batches == 0:
            assert time.monotonic() < deadline, "never joined"
            pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])
            seq += 1
            await asyncio.sleep(0.02)
        assert server.matched_blocks(chain_hashes(list(range(11, 23)), 4, root_hash(None))) == 3
        pub.send_multipart([b"kv-events", b"\x00" * 8, b"garbage"])
        pub.send_multipart([b"only-one-frame"])
        await until(
            lambda: (
                sample(
                    registry, "extproc_kv_event_batches_total", backend=ep, outcome="undecodable"
                )
                == 2
            ),
            what="garbage counted",
        )
        gap_seq = server.last_seq + 5
        pub.send_multipart(
            [
                b"kv-events",
                gap_seq.to_bytes(8, "big"),
                (FIXTURES / "removed_cleared.msgpack").read_bytes(),
            ]
        )
        await until(
            lambda: (
                sample(registry, "extproc_kv_event_batches_total", backend=ep, outcome="gap") == 1
            ),
            what="gap counted",
        )
        assert len(server) == 0
    finally:
        await subs.stop()
        pub.close(0)
        ctx.term()


async def test_no_address_no_subscription(parts):
    index, metrics, _ = parts
    subs = KvEventSubscriptions(index, metrics)  # neither a port nor explicit endpoints
    subs.sync(["10.0.0.1:8000"])
    assert not subs.addresses and not index.servers
    assert subs.address_of("[::1]:8000") is None
    v6 = KvEventSubscriptions(index, metrics, port=5557)
    assert v6.address_of("[::1]:8000") == "tcp://[::1]:5557"
    await subs.stop()
    await v6.stop()


async def test_changed_address_resubscribes(tmp_path, parts):
    index, metrics, _ = parts
    subs = KvEventSubscriptions(index, metrics, port=5999)
    subs.sync(["127.0.0.1:8000"])
    first = subs._tasks["127.0.0.1:8000"]
    subs.explicit["127.0.0.1:8000"] = f"ipc://{tmp_path}/moved"
    subs.sync(["127.0.0.1:8000"])
    assert subs._tasks["127.0.0.1:8000"] is not first
    await asyncio.sleep(0)
    assert first.cancelled() or first.done()
    await subs.stop()


def test_parse_endpoint_map():
    assert parse_endpoint_map(
        ["10.0.0.7:8000=tcp://10.0.0.7:5557", " [::1]:8001 = ipc:///tmp/kv "]
    ) == {"10.0.0.7:8000": "tcp://10.0.0.7:5557", "[::1]:8001": "ipc:///tmp/kv"}
    for bad in (
        "10.0.0.7:8000",
        "10.0.0.7=tcp://x:1",
        "10.0.0.7:0=tcp://x:1",
        "10.0.0.7:80=http://x:1",
        ":80=ipc://x",
    ):
        with pytest.raises(ValueError, match="kv-events-endpoint"):
            parse_endpoint_map([bad])


async def test_handle_counts_bad_events_and_ignores_unknown_servers(parts, caplog):
    import msgspec

    index, metrics, registry = parts
    subs = KvEventSubscriptions(index, metrics, endpoints={"127.0.0.1:8000": "ipc:///nowhere"})
    payload = msgspec.msgpack.encode([1.0, [{"type": "Mystery"}, {"type": "AllBlocksCleared"}], 0])
    subs.handle(
        "127.0.0.1:8000", [b"", (0).to_bytes(8, "big"), payload]
    )  # not subscribed yet: ignored
    assert "127.0.0.1:8000" not in index.servers
    subs.sync(["127.0.0.1:8000"])
    subs.handle("127.0.0.1:8000", [b"", (0).to_bytes(8, "big"), payload])
    assert (
        sample(registry, "extproc_kv_events_total", backend="127.0.0.1:8000", type="undecodable")
        == 1
    )
    assert (
        sample(
            registry, "extproc_kv_events_total", backend="127.0.0.1:8000", type="AllBlocksCleared"
        )
        == 1
    )
    subs.handle(
        "127.0.0.1:8000", [b"", (0).to_bytes(8, "big"), payload]
    )  # seq went back: a restart
    assert (
        sample(
            registry, "extproc_kv_event_batches_total", backend="127.0.0.1:8000", outcome="restart"
        )
        == 1
    )
    assert "restart at seq 0" in caplog.text
    metrics.forget_backend("127.0.0.1:8000")
    metrics.forget_backend("127.0.0.1:8000")  # twice: nothing left to remove
    assert (
        sample(registry, "extproc_kv_events_total", backend="127.0.0.1:8000", type="undecodable")
        is None
    )
    await subs.stop()
