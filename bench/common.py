"""The one results writer of the benchmarks: bench/results/<name>.json and <name>.md with
machine info (CPU, Python, git commit), written atomically; plus the code fingerprint runs
record so that results measured on different code can be told apart.

Benchmarks are run as scripts (``python bench/bench_x.py``), so they import this as ``common``
(the script's own folder is first on sys.path) or as ``bench.common``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> str | None:
    # Which tree the figures belong to; "+dirty" when uncommitted changes were benchmarked.
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        # Untracked files count (new code is often not committed yet); results files do not.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they only mean something next to this."""
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "command": " ".join(["python", *sys.argv]),
        "git_commit": git_commit(),
    }


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """GitHub table; ``align`` is one char per column: 'l', 'r' or 'c' (default: left)."""
    align = align or "l" * len(headers)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file: a reader (or a crashed run) never sees
    half a file; *.tmp is git-ignored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def finite(o: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON has no NaN."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """Strict JSON (NaN -> null), atomically; ``indent=None`` = one compact line."""
    compact = (",", ":") if indent is None else None
    text = json.dumps(finite(data), indent=indent, default=str, separators=compact)
    write_atomic(path, text + "\n")


def write_results(
    name: str, data: dict[str, Any], markdown: str, results_dir: Path | None = None
) -> None:
    """Write <results_dir>/<name>.json (``data`` plus a "machine" key unless it has one) and
    <name>.md (``markdown`` followed by a one-line machine footer); results_dir defaults to
    bench/results."""
    out = results_dir or RESULTS_DIR
    info = machine_info()
    payload = dict(data)
    payload.setdefault("machine", info)
    write_atomic(out / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    footer = (
        f"_Measured {info['date_utc']} on {info['cpus_usable']}/{info['cpu_count']} CPUs "
        f"({info['cpu_model'] or info['machine']}), {info['python_impl']} {info['python']}, "
        f"{info['os']}; commit {info['git_commit'] or 'unknown'}; `{info['command']}`._\n"
    )
    write_atomic(out / f"{name}.md", markdown.rstrip("\n") + "\n\n" + footer)


def code_fingerprint() -> dict[str, str]:
    """sha256 (16 hex) of what decides routing: envoy/envoy.yaml, extproc/ and vllmsim/ sources.
    Recorded per run: a repository edited while a benchmark runs shows up as differing values."""
    out = {}
    for name, paths in (
        ("envoy.yaml", [REPO_ROOT / "envoy" / "envoy.yaml"]),
        ("extproc", sorted((REPO_ROOT / "extproc").rglob("*.py"))),
        ("vllmsim", sorted((REPO_ROOT / "vllmsim").rglob("*.py"))),
    ):
        h = hashlib.sha256()
        for p in paths:
            with contextlib.suppress(OSError):
                h.update(p.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out
