"""``extproc serve``: command-line entry point. Flags mirror :class:`extproc.config.Settings`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from extproc.config import ConfigError, Settings, load_settings
from extproc.strategies import STRATEGIES

_REPEATABLE = {"backend", "backends_dns", "k8s_target_port", "kv_events_endpoint", "tokenizer"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description="LLM-aware routing for Envoy (ext_proc service)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the ext_proc gRPC service",
        description="Run the ext_proc gRPC service. Every flag can also be set by the environment variable "
        "EXTPROC_<FLAG> (e.g. EXTPROC_STRATEGY) or a YAML file (--config); precedence: "
        "flag > environment > file > default.",
    )
    # argparse, not pydantic-settings' CliSettingsSource: that one would take --profiles as JSON
    # only (YAML text fails with a traceback) and print "(default factory: list)" in --help.
    # Parsed values go to Settings as init values (load_settings), above environment and file.
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name == "strategy":
            help_text += f" Built in: {', '.join(STRATEGIES)}."
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if name in _REPEATABLE:
            kwargs["action"] = "append"
        elif field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.annotation is float:
            kwargs["type"] = float
        elif field.annotation is int:
            kwargs["type"] = int
        default = field.get_default(call_default_factory=True)
        kwargs["help"] += f" (default: {default if default != '' else repr('')})"
        serve.add_argument(flag, **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from extproc.app import run  # late import: keeps `--help` fast

    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:  # found at start, e.g. an unreadable --tls-cert
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. address already in use
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    return 0
