"""bench/routers.py: the contenders' configs (no processes)."""

from __future__ import annotations

import yaml


def test_envoy_round_robin_config_drops_ext_proc_and_balances_round_robin():
    from bench.routers import envoy_round_robin_config

    cfg = yaml.safe_load(
        envoy_round_robin_config(
            listener_port=10001,
            admin_port=10002,
            backends=[("127.0.0.1", 8001), ("127.0.0.1", 8002)],
        )
    )
    res = cfg["static_resources"]
    text = yaml.safe_dump(cfg)
    assert "ext_proc" not in text.replace("ext_proc_stream_close", "")
    assert "lua" not in text  # the pick filter acts on ext_proc's answer only
    assert [c["name"] for c in res["clusters"]] == ["vllm"]
    vllm = res["clusters"][0]
    names = [p["typed_extension_config"]["name"] for p in vllm["load_balancing_policy"]["policies"]]
    assert names == ["envoy.load_balancing_policies.round_robin"]
    eps = vllm["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [8001, 8002]
    assert res["listeners"][0]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 10001,
    }
