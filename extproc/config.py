"""Settings: defaults < YAML file (``--config``) < ``EXTPROC_*`` environment < command line.

pydantic-settings merges the sources (:meth:`Settings.settings_customise_sources`); the command
line arrives as init values (extproc/cli.py builds the flags from the fields).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from extproc.strategies import FALLBACKS, Profile, ProfileError, load_profiles


class ConfigError(Exception):
    pass


class YamlFileSource(PydanticBaseSettingsSource):
    """The ``--config`` YAML file; keys as the flags, with ``-`` or ``_``. Its path is itself a
    setting (flag or ``EXTPROC_CONFIG``), taken from the sources above this one: hence not
    ``YamlConfigSettingsSource``, whose path is fixed in the class's model_config."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Abstract in the base; pydantic-settings calls only __call__, which reads the whole file.
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read --config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path} must be a YAML mapping")
        values = {str(k).replace("-", "_"): v for k, v in data.items()}
        if "config" in values:
            raise ConfigError(f"--config {path}: 'config' cannot be set inside the file")
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXTPROC_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first; the field defaults come last on their own. No .env or secrets files.
        return init_settings, env_settings, YamlFileSource(settings_cls)

    config: str = Field(
        "",
        description="YAML file with settings: keys as the flags ('-' or '_'), e.g. scrape-interval: 0.2; "
        "'profiles:' adds routing profiles. Read once at start.",
    )
    grpc_address: str = Field(
        "127.0.0.1:9002", description="host:port the ext_proc gRPC server listens on."
    )
    admin_address: str = Field(
        "127.0.0.1:9090",
        description="host:port of the admin HTTP server (/metrics, /healthz, /backends).",
    )
    backend: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Backend base URL, e.g. http://127.0.0.1:8001 (repeatable; env: comma-separated).",
    )
    backends_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NAME:PORT resolved to all its addresses, re-resolved every --dns-refresh seconds (repeatable).",
    )
    dns_refresh: float = Field(
        5.0, gt=0, description="Seconds between DNS re-resolutions for --backends-dns."
    )
    address_family: Literal["ipv4", "ipv6", "any"] = Field(
        "ipv4",
        description="Addresses kept from DNS (--backends-dns, host names in --backend). Match the Envoy "
        "cluster's dns_lookup_family (V4_ONLY in envoy/envoy.yaml): a pick Envoy does not know is ignored.",
    )
    k8s_inference_pool: str = Field(
        "",
        description="Kubernetes discovery: follow the InferencePool (inference.networking.k8s.io/v1) of this "
        "name: its spec.selector.matchLabels pick the pods, spec.targetPorts their ports; changes apply live. "
        "Backends = Ready, non-terminating pods x target ports. Excludes --k8s-selector, --backend, --backends-dns.",
    )
    k8s_selector: str = Field(
        "",
        description="Kubernetes discovery without a pool: label selector of the backend pods, key=value[,key=value] "
        "(needs --k8s-target-port).",
    )
    k8s_target_port: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Port(s) of the pods selected by --k8s-selector (repeatable or comma-separated).",
    )
    k8s_namespace: str = Field(
        "",
        description="Namespace of the pool and its pods. Empty: the pod's own namespace (service account), "
        "else the kubeconfig context's, else 'default'.",
    )
    fallback_endpoints: int = Field(
        3,
        ge=0,
        le=16,
        description="Next-best servers listed after the pick in x-gateway-destination-endpoint (ip:port,ip:port,...); "
        "Envoy tries them in order when the pick refuses the connection. Use 0 behind an ORIGINAL_DST gateway "
        "(the GIE reference Envoy config): it takes one address, a list is a 503.",
    )
    empty_pool: Literal["envoy", "reject"] = Field(
        "envoy",
        description="With no backend known: 'envoy' answers without a destination (Envoy's fallback policy "
        "picks from its own cluster; 503 JSON if that is empty too); 'reject' answers an OpenAI-shaped 503. "
        "Either way gRPC health is NOT_SERVING while the pool is empty.",
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM: gRPC health NOT_SERVING at once, keep answering this long (so Envoy's "
        "health check moves new streams to another replica), then wait for open streams (--stop-grace).",
    )
    stop_grace: float = Field(
        10.0,
        ge=0,
        description="After the drain: seconds open ext_proc streams (running HTTP requests) may take to "
        "finish; the rest are ended with status OK, which Envoy does not count as a failure.",
    )
    shed_queue_depth: float = Field(
        0,
        ge=0,
        description="Answer 429 (with retry-after) when every candidate server reports more than this many "
        "waiting requests; 0 = never shed. Servers without measured metrics never count as full. A route's "
        "x-extproc-shed-queue-depth overrides it.",
    )
    strategy: str = Field(
        "weighted",
        description="Default routing strategy: a profile, built in or added by --profiles / --config.",
    )
    # NoDecode: the environment's text goes to _profiles_text (JSON or YAML) like the flag's, and
    # replaces the file's mapping whole instead of being deep-merged into it.
    profiles: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="Routing profiles to add or override: a mapping name -> {scorers: {scorer: weight or "
        "{weight, parameter: value}}, picker: name or {name, parameter: value}, reason: scorer} (README "
        "'Strategies'). Usually the 'profiles:' key of --config; on the command line as JSON or YAML text.",
    )
    fallback: Literal["random", "round-robin"] = Field(
        "random",
        description="Load-blind strategy used when metrics are missing (cold cache) or a strategy fails.",
    )
    scrape_interval: float = Field(
        0.1, gt=0, description="Seconds between two /metrics scrapes of one backend."
    )
    scrape_timeout: float = Field(
        0.5,
        gt=0,
        description="Per-scrape timeout in seconds. A timeout makes the backend suspect (treated as saturated, "
        "excluded while another backend is eligible) until a scrape answers again.",
    )
    scrape_connect_timeout: float = Field(
        0.25,
        gt=0,
        description="Connect timeout of a scrape (seconds). Not connecting in time, like a refused connection, "
        "means down: the backend is unhealthy at once.",
    )
    max_scrape_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest /metrics or /v1/models reply read (bytes); larger is a failed scrape.",
    )
    scrape_budget: float = Field(
        0.5,
        ge=0,
        description="CPU cores scraping may use (measured cost per scrape x scrapes per second); 0 = no "
        "limit. When the pool needs more, idle steady backends are scraped less often first (up to 10x "
        "--scrape-interval, at most --stale-after), busy or changing ones last. Default: half a core, "
        "so scraping never takes the decision core (README 'Sizing the scrape budget').",
    )
    stale_after: float = Field(
        1.0,
        gt=0,
        description="Metrics older than this (s) are stale: still used, with in-flight added.",
    )
    max_metrics_age: float = Field(
        10.0,
        gt=0,
        description="Metrics older than this (s) are unknown: the backend gets a prior instead.",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest request body the service reads (bytes); larger ones get 413. Keep Envoy's "
        "per_connection_buffer_limit_bytes at least as large.",
    )
    models_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between GET /v1/models per backend (model pools and LoRA adapters).",
    )
    weights: str = Field(
        "queue=1,kv=1,prefix=4,lora=1",
        description="Scorer weights of the 'weighted' profile, scorer=weight,... (missing scorers keep theirs; "
        "applied on top of --profiles when given; a route's x-extproc-weights overrides them).",
    )
    prefix_guard_abs: float = Field(
        8.0,
        ge=0,
        description="prefix-cache load guard: leave the best match when its load exceeds the least "
        "loaded server's by more than this many requests AND by --prefix-guard-rel times (the prefix scorer's "
        "guard_abs in the 'prefix-cache' profile; applied on top of --profiles when given).",
    )
    prefix_guard_rel: float = Field(
        1.5, ge=1.0, description="prefix-cache load guard factor (see --prefix-guard-abs)."
    )
    expose_routing_headers: bool = Field(
        True,
        description="Emit the 'extproc' metadata that Envoy turns into x-routing-* response headers.",
    )
    grpc_health_address: str = Field(
        "",
        description="host:port of a second, always plaintext gRPC server that answers only grpc.health.v1 "
        "(the same statuses as --grpc-address): kubelet gRPC probes do not speak TLS. Empty: off.",
    )
    tls_cert: str = Field(
        "",
        description="PEM certificate (chain) for TLS on --grpc-address; needs --tls-key. Re-read when the "
        "files change: new connections get the new certificate, no restart needed.",
    )
    tls_key: str = Field("", description="Unencrypted PEM private key of --tls-cert.")
    tls_self_signed: bool = Field(
        False,
        description="TLS on --grpc-address with a self-signed certificate made at start (its SHA-256 "
        "fingerprint is logged): what gateways expect from an endpoint picker (Istio and the Gateway API "
        "Inference Extension configs use TLS without verifying the certificate).",
    )
    pool_name: str = Field(
        "",
        description="The 'name' label of the inference_pool_* metrics (Gateway API Inference Extension "
        "dashboards). Empty: the --k8s-inference-pool name if set, else 'default'.",
    )
    kv_events_port: int = Field(
        0,
        ge=0,
        lt=65536,
        description="Exact prefix-cache state: subscribe to the vLLM KV-event publisher at tcp://<server ip>:PORT "
        "of every discovered server (vLLM --kv-events-config with endpoint tcp://*:PORT). 0 = off. Needs "
        "--tokenizer for the model; servers that send nothing keep the approximate prefix index.",
    )
    kv_events_endpoint: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="IP:PORT=ZMQ_ENDPOINT: the KV-event publisher of the server at IP:PORT (e.g. "
        "127.0.0.1:8001=ipc:///tmp/kv1 or tcp://HOST:PORT); overrides --kv-events-port for it (repeatable).",
    )
    kv_events_max_blocks: int = Field(
        100_000,
        gt=0,
        description="Largest number of blocks the exact prefix index keeps per server (least recently stored "
        "dropped first).",
    )
    tokenizer: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MODEL=PATH_OR_NAME: the tokenizer (folder with tokenizer.json and chat template, a "
        "tokenizer.json, a Hugging Face hub name, or 'vllmsim') used to match prompts against KV events; "
        "MODEL '*' = every model (repeatable).",
    )
    tokenize_max_chars: int = Field(
        8192,
        gt=0,
        description="Most characters of new prompt text tokenized per request for the exact prefix index "
        "(chat segments seen before, e.g. a shared system prompt or earlier turns, are cached and free); "
        "the prompt is matched up to there. Bounds the cost per request (~0.3-0.6 us per character).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Decision worker processes. 1: one process does everything. N >= 2: a main process "
        "discovers and scrapes the backends and serves the admin port; N worker processes answer ext_proc "
        "on the same --grpc-address (SO_REUSEPORT) from the main's published snapshot, with in-flight counts "
        "shared across them (docs/scaling.md).",
    )
    worker_ports: int = Field(
        0,
        ge=0,
        le=65535,
        description="With --workers N: worker i also listens on this port + i (the host and TLS of "
        "--grpc-address), for an Envoy cluster that lists the N worker addresses: Envoy then balances "
        "every ext_proc stream over the workers, where the shared port spreads whole connections at "
        "random (docs/scaling.md). 0: the shared port only.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @field_validator("backend", "backends_dns", "kv_events_endpoint", "tokenizer", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("kv_events_endpoint")
    @classmethod
    def _kv_endpoints(cls, v: list[str]) -> list[str]:
        from extproc.kv_subscriber import parse_endpoint_map

        parse_endpoint_map(v)
        return v

    @field_validator("tokenizer")
    @classmethod
    def _tokenizers(cls, v: list[str]) -> list[str]:
        from extproc.tokenizer import parse_tokenizer_specs

        parse_tokenizer_specs(v)
        return v

    @field_validator("profiles", mode="before")
    @classmethod
    def _profiles_text(cls, v: Any) -> Any:
        if isinstance(v, str):  # the command line: JSON or YAML text
            try:
                return yaml.safe_load(v) if v.strip() else {}
            except yaml.YAMLError as exc:
                raise ValueError(f"not JSON/YAML: {exc}") from None
        return v

    @model_validator(mode="after")
    def _known_strategy(self) -> Settings:
        try:
            table = self.profile_table()
        except ProfileError as exc:
            raise ValueError(str(exc)) from None
        if self.strategy not in table:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(table)}")
        return self

    def profile_table(self) -> dict[str, Profile]:
        """Every profile a request can be routed by: built-ins < --profiles < --weights and
        --prefix-guard-* (only when set: their defaults are the built-ins' values)."""
        given = self.model_fields_set
        guard = {
            f"guard_{k}": getattr(self, f"prefix_guard_{k}")
            for k in ("abs", "rel")
            if f"prefix_guard_{k}" in given
        }
        weights = None
        if "weights" in given:
            from extproc.route_settings import parse_weights

            weights = parse_weights(self.weights)
        return load_profiles(self.profiles, weights=weights, prefix_guard=guard or None)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        from extproc.route_settings import parse_weights

        parse_weights(v)
        return v

    @model_validator(mode="after")
    def _ages(self) -> Settings:
        if self.max_metrics_age < self.stale_after:
            raise ValueError("max_metrics_age must be >= stale_after")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_self_signed and self.tls_cert:
            raise ValueError(
                "--tls-self-signed and --tls-cert/--tls-key exclude each other: pick one"
            )
        return self

    @field_validator("k8s_target_port", mode="before")
    @classmethod
    def _ports(cls, v: Any) -> Any:
        from extproc.k8s_discovery import parse_ports

        return parse_ports(v if isinstance(v, list | tuple) else [v])

    @field_validator("k8s_selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        if v.strip():
            from extproc.k8s_discovery import parse_selector

            parse_selector(v)
        return v.strip()

    @field_validator("k8s_namespace", "k8s_inference_pool")
    @classmethod
    def _k8s_name(cls, v: str) -> str:
        # DNS-1123: lower-case alphanumerics and '-' (and '.' in object names).
        if v and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", v):
            raise ValueError(
                f"{v!r} is not a Kubernetes name (lower-case letters, digits, '-', '.')"
            )
        return v

    @model_validator(mode="after")
    def _k8s(self) -> Settings:
        if self.k8s_inference_pool and self.k8s_selector:
            raise ValueError(
                "--k8s-inference-pool and --k8s-selector exclude each other: the pool's "
                "spec.selector already names the pods"
            )
        if self.k8s_selector and not self.k8s_target_port:
            raise ValueError("--k8s-selector needs --k8s-target-port (the pods' serving port)")
        if self.k8s_target_port and not self.k8s_selector:
            raise ValueError(
                "--k8s-target-port goes with --k8s-selector (a pool names its ports in "
                "spec.targetPorts)"
            )
        if (self.k8s_inference_pool or self.k8s_selector) and (self.backend or self.backends_dns):
            raise ValueError(
                "Kubernetes discovery (--k8s-*) replaces --backend/--backends-dns: give one or the other"
            )
        return self


def load_settings(cli: dict[str, Any], config_file: str | None = None) -> Settings:
    """Settings from the command-line values ``cli`` (None = not given), the environment, the
    YAML file (``config_file`` or ``cli['config']`` or ``EXTPROC_CONFIG``) and the defaults;
    raise ConfigError with a readable message."""
    given = {k: v for k, v in cli.items() if v is not None}
    if config_file:
        given["config"] = config_file
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    except SettingsError as exc:  # a source could not decode a value, e.g. from the environment
        raise ConfigError(f"invalid settings:\n  {exc}") from None
