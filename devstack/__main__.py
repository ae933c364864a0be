"""``python -m devstack`` (= ``make run``): 3 simulators + the service + Envoy on loopback.

Prints the gateway URL and a curl line, keeps every process log in files, and stops everything
cleanly on Ctrl-C or SIGTERM - and only then: when a child dies or hangs, a line on the terminal
says which one and how (exit code, signal, "not answering /health ... (process state:
stopped)"), the rest keeps serving, and a dead service or Envoy is restarted automatically
(``--no-restart`` turns that off; simulators are never restarted, their death is what the
service routes around).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from devstack.processes import ProcessStartError, port_is_free
from devstack.stack import Stack, Supervisor, stack_watches


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    p.add_argument("--backends", type=int, default=3, help="number of vLLM simulators (3)")
    p.add_argument(
        "--first-sim-port", type=int, default=8001, help="simulator ports start here (8001)"
    )
    p.add_argument("--grpc-port", type=int, default=9002, help="service gRPC port (9002)")
    p.add_argument("--service-admin-port", type=int, default=9090, help="service admin port (9090)")
    p.add_argument("--envoy-port", type=int, default=10000, help="Envoy listener port (10000)")
    p.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy admin port (9901)")
    p.add_argument(
        "--log-dir", type=Path, default=Path("run/devstack"), help="process logs (run/devstack)"
    )
    p.add_argument(
        "--sim-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every simulator (repeatable), e.g. --sim-arg=--seed=1",
    )
    p.add_argument(
        "--service-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `extproc serve` (repeatable), e.g. --service-arg=--strategy=random",
    )
    p.add_argument(
        "--envoy-concurrency", type=int, default=None, help="Envoy worker threads (Envoy default)"
    )
    p.add_argument(
        "--extproc-tls",
        choices=["self-signed", "files"],
        default="",
        help="TLS between Envoy and the service: self-signed (not verified, as gateways do) or "
        "files (a certificate in the log dir that Envoy verifies); default plaintext",
    )
    p.add_argument(
        "--envoy-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="Envoy config to run instead of envoy/envoy.yaml, e.g. envoy/gie-reference.yaml (then also "
        "--service-arg=--fallback-endpoints=0) or envoy/istio-style.yaml; only its addresses are rewritten",
    )
    p.add_argument(
        "--no-restart",
        action="store_true",
        help="do not restart the service or Envoy when they die (they are reported either way)",
    )
    p.add_argument(
        "--hang-after",
        type=float,
        default=3.0,
        help="report a process whose health endpoint has not answered for this long (3 s)",
    )
    return p.parse_args(argv)


def _busy_ports(ports: dict[int, str]) -> list[str]:
    return [
        f"port {port} ({label}) is already in use - stop what listens there "
        f"(see `ss -ltnp 'sport = :{port}'`) or choose another port (--help)"
        for port, label in ports.items()
        if not port_is_free(port)
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sim_ports = [args.first_sim_port + i for i in range(args.backends)]
    wanted = {p: f"vLLM simulator {i + 1}" for i, p in enumerate(sim_ports)}
    wanted |= {
        args.grpc_port: "service gRPC",
        args.service_admin_port: "service admin",
        args.envoy_port: "Envoy listener",
        args.envoy_admin_port: "Envoy admin",
    }
    if len(wanted) != args.backends + 4:
        print("devstack: the chosen ports overlap", file=sys.stderr)
        return 2
    if args.envoy_config is not None and not args.envoy_config.is_file():
        print(f"devstack: --envoy-config {args.envoy_config}: no such file", file=sys.stderr)
        return 2
    busy = _busy_ports(wanted)
    if busy:
        for line in busy:
            print(f"devstack: {line}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            # During startup there is no wait loop yet: unwind the start itself.
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stack = Stack(
        log_dir=args.log_dir,
        n_backends=args.backends,
        common_sim_args=args.sim_arg,
        service_args=args.service_arg,
        sim_ports=sim_ports,
        grpc_port=args.grpc_port,
        service_admin_port=args.service_admin_port,
        envoy_port=args.envoy_port,
        envoy_admin_port=args.envoy_admin_port,
        envoy_concurrency=args.envoy_concurrency,
        extproc_tls=args.extproc_tls,
        envoy_template=args.envoy_config,
    )
    print(
        f"devstack: starting {args.backends} simulators, the service and Envoy (logs: {args.log_dir}/) ...",
        flush=True,
    )
    code = 0
    try:
        stack.start()
        body = '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}]}'
        print(
            f"\nLLM gateway ready: {stack.url}\n"
            f"  simulators:      {', '.join(stack.sim_urls)}\n"
            f"  service admin:   {stack.admin_url}   (gRPC {stack.grpc_address})\n"
            f"  Envoy admin:     {stack.envoy_admin_url}\n"
            f"  logs:            {args.log_dir}/*.log\n\n"
            "Try (-i shows the x-routing-strategy / x-routing-reason / x-routed-endpoint headers):\n\n"
            f"  curl -i {stack.url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'\n\n"
            "A process that dies or hangs is reported here; the rest keeps serving"
            + ("." if args.no_restart else "; the service and Envoy are restarted automatically.")
            + "\nCtrl-C stops everything.",
            flush=True,
        )

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        # Supervise until Ctrl-C/SIGTERM: a child's death or hang is reported, never fatal.
        supervisor = Supervisor(
            stack_watches(
                stack, restart_service=not args.no_restart, restart_envoy=not args.no_restart
            ),
            say=say,
            hang_after=args.hang_after,
        )
        while not stop.wait(0.5):
            supervisor.check()
    except KeyboardInterrupt:
        pass
    except ProcessStartError as exc:
        print(f"devstack: start failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        # Ignore further signals while stopping, so a second Ctrl-C cannot orphan children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("devstack: stopped.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
