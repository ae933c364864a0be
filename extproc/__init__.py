"""LLM-aware routing for Envoy: an ext_proc gRPC service that picks a vLLM server per request."""

__version__ = "0.1.0"
