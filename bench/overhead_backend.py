"""Fast stand-ins for the overhead benchmark (bench/bench_overhead.py).

Two pieces, both as fast as we can make them so that the benchmark measures ROUTING, not the
backend:

* :func:`render_fake_vllm_config` - an Envoy config for a SEPARATE Envoy process that plays N
  fake vLLM servers on loopback ports, with ``direct_response`` only (no upstream, no Python):
  ``POST /v1/chat/completions`` answers a canned OpenAI chat completion, ``GET /metrics`` answers
  a real vLLM ``/metrics`` capture (so the service's scraper parses real data every 100 ms, as in
  production), ``GET /v1/models`` the model list (a 404 there would make the service ask again
  after every scrape, doubling the scrape traffic), ``GET /health`` answers 200, anything else
  404.
* ``python bench/overhead_backend.py bare-processor --port P --endpoint IP:PORT`` - a BARE
  grpc.aio ext_proc processor: it parses each message only to learn its phase and answers with a
  pre-serialized response; the request-headers answer sets ``x-gateway-destination-endpoint``
  to a fixed backend, the other phases (buffered request body, response trailers) get a plain
  CONTINUE. It speaks the same protocol as our service on the same routes (envoy/envoy.yaml
  sends the chat body to the service: two messages per request), without any decision,
  metadata or bookkeeping: the floor of any grpc.aio-based service, measured in the same
  invocation as ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"

# GET /v1/models of a vLLM serving one model.
MODELS_LIST: dict[str, Any] = {
    "object": "list",
    "data": [{"id": "tiny-llama", "object": "model", "owned_by": "vllm", "max_model_len": 2048}],
}

# A realistic non-streaming OpenAI chat completion (about 450 bytes).
CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1735689600,
    "model": "tiny-llama",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "tool_calls": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "total_tokens": 18,
        "completion_tokens": 9,
        "prompt_tokens_details": None,
    },
    "prompt_logprobs": None,
}


def fixtures_dir() -> Path:
    """Real vLLM captures kept in the repo ($VLLM_FIXTURES_DIR overrides)."""
    env = os.environ.get("VLLM_FIXTURES_DIR")
    return Path(env) if env else REPO_ROOT / "tests" / "fixtures"


def metrics_fixture() -> Path:
    path = fixtures_dir() / "vllm-metrics-real.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (set VLLM_FIXTURES_DIR to the folder of the vLLM captures)"
        )
    return path


def _sock(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": int(port)}}


def render_fake_vllm_config(
    ports: list[int], admin_port: int, metrics_file: Path | None = None
) -> dict[str, Any]:
    """Envoy config (parsed structure) for N fake vLLM servers, one listener per port."""
    metrics_file = metrics_file or metrics_fixture()
    size = metrics_file.stat().st_size
    chat_body = json.dumps(CHAT_COMPLETION, separators=(",", ":"))
    json_ct = [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]

    def route_config(port: int) -> dict[str, Any]:
        return {
            "name": f"fake_vllm_{port}",
            # The /metrics page is ~52 KB; Envoy's default cap for direct_response bodies is 4 KB.
            "max_direct_response_body_size_bytes": max(65536, size * 2),
            "virtual_hosts": [
                {
                    "name": "vllm",
                    "domains": ["*"],
                    "routes": [
                        {
                            # Every POST under /v1/ (chat, completions, embeddings) gets the canned
                            # answer: the bench also drives a headers-only route (/v1/embeddings).
                            "match": {
                                "prefix": "/v1/",
                                "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
                            },
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": chat_body},
                            },
                            "response_headers_to_add": json_ct,
                        },
                        {
                            "match": {"path": "/metrics"},
                            "direct_response": {
                                "status": 200,
                                "body": {"filename": str(metrics_file)},
                            },
                            "response_headers_to_add": [
                                {
                                    "header": {
                                        "key": "content-type",
                                        "value": "text/plain; version=0.0.4; charset=utf-8",
                                    },
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                        },
                        {
                            "match": {"path": "/v1/models"},
                            "direct_response": {
                                "status": 200,
                                "body": {
                                    "inline_string": json.dumps(MODELS_LIST, separators=(",", ":"))
                                },
                            },
                            "response_headers_to_add": json_ct,
                        },
                        {"match": {"path": "/health"}, "direct_response": {"status": 200}},
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 404,
                                "body": {"inline_string": '{"detail":"Not Found"}'},
                            },
                            "response_headers_to_add": json_ct,
                        },
                    ],
                }
            ],
        }

    listeners = []
    for port in ports:
        listeners.append(
            {
                "name": f"fake_vllm_{port}",
                "address": _sock(port),
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": f"fake_vllm_{port}",
                                    "codec_type": "AUTO",
                                    "route_config": route_config(port),
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                            },
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        )
    return {"admin": {"address": _sock(admin_port)}, "static_resources": {"listeners": listeners}}


# --------------------------------------------------------------------------- bare processor
def bare_responses(endpoint: str) -> dict[str, bytes]:
    """Pre-serialized answers per ext_proc phase; request headers set the destination header."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    mutation = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    common = ep.CommonResponse()
    return {
        "request_headers": ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(
                response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(set_headers=[mutation])
                )
            )
        ).SerializeToString(),
        "request_body": ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=common)
        ).SerializeToString(),
        "response_headers": ep.ProcessingResponse(
            response_headers=ep.HeadersResponse(response=common)
        ).SerializeToString(),
        "response_body": ep.ProcessingResponse(
            response_body=ep.BodyResponse(response=common)
        ).SerializeToString(),
        "request_trailers": ep.ProcessingResponse(
            request_trailers=ep.TrailersResponse()
        ).SerializeToString(),
        "response_trailers": ep.ProcessingResponse(
            response_trailers=ep.TrailersResponse()
        ).SerializeToString(),
    }


async def serve_bare(port: int, endpoint: str) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    answers = bare_responses(endpoint)

    async def process(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        # One answer per message, chosen by its phase; the stream ends when Envoy closes it.
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            answer = answers.get(req.WhichOneof("request") or "")
            if answer:
                await context.write(answer)

    rpc = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=ep.ProcessingRequest.FromString,
        response_serializer=lambda b: b,
    )
    # Same server options as extproc/grpc_server.py, so the comparison is like for like.
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": rpc}),)
    )
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"address already in use: 127.0.0.1:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"bare processor on 127.0.0.1:{port} -> {endpoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    bp = sub.add_parser("bare-processor", help="run the bare grpc.aio ext_proc processor")
    bp.add_argument("--port", type=int, required=True)
    bp.add_argument(
        "--endpoint", required=True, help="ip:port to put in x-gateway-destination-endpoint"
    )
    args = ap.parse_args()
    if args.cmd == "bare-processor":
        asyncio.run(serve_bare(args.port, args.endpoint))


if __name__ == "__main__":
    main()
