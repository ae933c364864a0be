"""Local stack launcher: real vLLM simulators, the ext_proc service and Envoy on loopback.

Used by ``make run`` (``python -m devstack``), the integration tests and the benchmarks
(bench/bench_routing.py, bench/bench_faults.py, bench/bench_soak.py). Everything binds
127.0.0.1 only.

Whole stack
-----------
::

    from devstack import Stack

    with Stack(log_dir=Path("run/bench-logs"), n_backends=3,
               sim_args=[["--max-num-seqs", "8"], [], []],   # per simulator (optional)
               common_sim_args=["--seed", "1"],                # every simulator (optional)
               service_args=["--strategy", "least-request"],
               direct_listener=True) as stack:                 # adds stack.direct_url
        stack.url            # "http://127.0.0.1:<port>"  Envoy listener (through the service)
        stack.direct_url     # Envoy listener WITHOUT ext_proc, always to backend 0 (overhead bench)
        stack.admin_url      # the service's admin HTTP ("/healthz", "/metrics", ...)
        stack.envoy_admin_url
        stack.grpc_address   # "127.0.0.1:<port>" of the service's gRPC server
        stack.sim_urls       # ["http://127.0.0.1:<p>", ...]
        stack.sim_endpoints  # ["127.0.0.1:<p>", ...]  (the form of the x-routed-endpoint header)
        stack.sims, stack.service, stack.envoy   # Proc objects (stop one to inject a failure)
        stack.log_tails()    # last lines of every log, for failure reports
        stack.wait_metrics_fresh()  # until the service has fresh metrics of every simulator

``Stack(..., sims_only=True)`` starts the simulators alone, for routers that bring their own
front (the benchmarks' Envoy round-robin and Rust routers).

Faults and scale-out (bench/bench_faults.py, bench/bench_soak.py): ``standby_backends=N`` declares N
more simulators to the service and to Envoy without starting them (start one mid-run to scale
out); ``service_replicas=2`` runs two service replicas behind Envoy's ``extproc`` cluster (rolling
restarts); ``stack.services`` lists the replicas. Simulators take ``POST /sim/faults`` to switch
faults at run time (docs/vllmsim.md). The docstrings in ``stack.py`` list the restart helpers.

Ports left unset are picked free (and the start is retried with new ports if one got taken);
set ``sim_ports``, ``grpc_port``, ``service_admin_port``, ``envoy_port``, ``envoy_admin_port``,
``direct_port`` to pin them. ``envoy_concurrency`` (default 1) sets Envoy's worker threads.

Single processes (``devstack.processes``)
-----------------------------------------
* ``free_port() -> int``
* ``start_vllmsim(port, *, args=(), log_dir) -> Proc`` - ready on GET /health == 200
* ``start_extproc(*, grpc_port, admin_port, backends: list[str] (URLs), args=(), log_dir) -> Proc``
  - ready on GET http://127.0.0.1:<admin_port>/healthz == 200
* ``start_envoy(config_yaml, *, log_dir, admin_port, concurrency=None) -> Proc``
  - ready when admin /ready says LIVE and every listener accepts connections
* ``find_envoy() -> str`` - the envoy binary ($PATH, then the venv's bin)
* ``validate_envoy_config(path) -> CompletedProcess`` - ``envoy --mode validate``
* ``Proc(name, argv, *, log_dir, env=None)`` - run any command the same way (own process group,
  log file); set ``proc.ready_check`` / ``proc.ready_what`` and call ``proc.wait_ready()``
* helpers: ``http_get(url, timeout) -> (status, body)``, ``poll_until(check, *, timeout, what,
  proc=None)``, ``port_is_free(port)``, ``port_is_open(port)``

Every ``start_*`` polls readiness against a deadline (``timeout=``, default 30 s), raises
``ProcessStartError`` (with the log tail) if the process exits or is not ready in time, and
accepts ``wait=False`` to launch now and ``proc.wait_ready()`` later.
``Proc`` has ``.pid``, ``.log_path`` (``<log_dir>/<name>.log``), ``.alive()``, ``.log_tail()``,
``.stop(timeout=5)`` (SIGTERM to the process group, SIGKILL after the timeout) and is a context
manager.

Envoy config (``devstack.envoy_config``)
----------------------------------------
``render_local_config(*, listener_port, admin_port, extproc_address: tuple[str, int],
backends: list[tuple[str, int]], direct_listener_port: int | None = None) -> str`` loads
``envoy/envoy.yaml`` and rewrites only addresses (loopback listener/admin, STATIC clusters), so
the local config cannot drift from the compose one.
"""

from devstack.envoy_config import render_local_config
from devstack.processes import (
    PortInUseError,
    Proc,
    ProcessStartError,
    find_envoy,
    free_port,
    start_envoy,
    start_extproc,
    start_vllmsim,
    validate_envoy_config,
)
from devstack.stack import Stack

__all__ = [
    "PortInUseError",
    "Proc",
    "ProcessStartError",
    "Stack",
    "find_envoy",
    "free_port",
    "render_local_config",
    "start_envoy",
    "start_extproc",
    "start_vllmsim",
    "validate_envoy_config",
]
