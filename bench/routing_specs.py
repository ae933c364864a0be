"""What the routing benchmark runs: the fleet, the workloads (with issue 9's targets), the
contenders, and where each run's record is stored. Shared by the runner (bench_routing.py)
and the report (routing_report.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import routers

RUNS_SUBDIR = "routing-runs"  # <out>/routing-runs/<workload>/{calibration.json, <run>.json}
RUN_FORMAT = 2

# ----------------------------------------------------------------------------- fleet
N_SIMS = 4


MAX_NUM_SEQS = 16


# Per simulator. The cost model stays at the simulator's defaults (docs/vllmsim.md
# "Calibration"); only the server is smaller:
# * --max-num-seqs 16: at capacity a server emits ~max_num_seqs/step_time tokens/s whatever
#   the request mix (16 / 7.5 ms ~ 2,100/s); the 4 servers together must stay within what this
#   box can stream through Envoy and a Python client (~3-5k SSE chunks/s wall, measured).
# * --num-gpu-blocks 1024: 16,384 tokens = 2 GiB of Llama-3-8B KV (128 KiB/token), the order of
#   what a 24 GB GPU keeps after 16 GB of weights; the fleet holds 4,096 blocks.
FLEET_ARGS = ["--max-num-seqs", str(MAX_NUM_SEQS), "--num-gpu-blocks", "1024"]


SLOW_FACTOR = 3.0  # heterogeneous fleet: these servers' step costs are all x3


def slow_server_args(factor: float = SLOW_FACTOR) -> list[str]:
    """vllmsim flags that make every step cost ``factor`` x the default (an older GPU)."""
    from vllmsim.config import SimConfig

    d = SimConfig()
    return [
        "--step-time-base", f"{d.step_time_base * factor:g}",
        "--prefill-token-time", f"{d.prefill_token_time * factor:g}",
        "--decode-seq-time", f"{d.decode_seq_time * factor:g}",
        "--decode-ctx-token-time", f"{d.decode_ctx_token_time * factor:g}",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- workloads
SHAREGPT = {"output_scale": 0.5, "output_max": 512}  # outputs halved: runs end within seconds


WORKLOAD_SIZE = 8000  # requests generated per workload and seed (runs replay a prefix)


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload and the fleet it runs on. ``target``: TTFT p90 of our default strategy /
    the best Rust-router policy's must be <= it at 85 % load (issue 9); ``target_rr`` the same
    against Envoy round-robin."""

    name: str
    kind: str
    params: dict[str, Any]
    models: str  # what it stands for, one sentence (report and docs)
    burstiness: float = 1.0
    # simulated s per wall s: only how fast results are produced, not what they are; 0.5 keeps
    # 110 % load within the box's streaming budget (see FLEET_ARGS).
    time_scale: float = 0.5
    slow: tuple[int, ...] = ()  # indexes of servers with SLOW_FACTOR x the costs
    target: float | None = None
    target_rr: float | None = None

    def sim_args(self, i: int) -> list[str]:
        return ["--instance-name", f"sim{i}", *(slow_server_args() if i in self.slow else [])]

    def digest(self) -> str:
        """What must be equal for runs to be comparable (not the code: that is recorded)."""
        key = json.dumps(
            [self.kind, self.params, self.burstiness, self.time_scale, self.slow, FLEET_ARGS,
             N_SIMS, SLOW_FACTOR, WORKLOAD_SIZE],
            sort_keys=True,
        )  # fmt: skip
        return hashlib.sha256(key.encode()).hexdigest()[:16]


WORKLOADS: dict[str, WorkloadSpec] = {
    w.name: w
    for w in (
        WorkloadSpec(
            "sharegpt",
            "sharegpt",
            SHAREGPT,
            "independent single-turn chats with ShareGPT-like lengths (nothing shared but the "
            "chat template), Poisson arrivals",
            target=1.0,
            target_rr=0.8,
        ),
        WorkloadSpec(
            "shared-prefix",
            "shared-prefix",
            {"num_groups": 32, "system_prompt_len": 1024, "question_len": 48, "output_len": 48},
            "32 groups x 1,024-token system prompt + a unique ~48-token question, groups "
            "uniform: the prefixes (2,048 blocks) fit the fleet's cache, not one server's",
            target=0.8,
        ),
        WorkloadSpec(
            "heterogeneous",
            "sharegpt",
            SHAREGPT,
            "the sharegpt mix on a fleet where sim2 and sim3 are 3x slower (every step cost "
            "x3, an older GPU generation); capacity = the sum of the four servers'",
            slow=(2, 3),
            target=1.0,
            target_rr=0.8,
        ),
        WorkloadSpec(
            "multi-turn",
            "multi-turn",
            {"output_scale": 0.5},
            "chat sessions of 2-10 turns resending their growing history (200-token app "
            "prompt, ~60-token questions, ~60-token answers), think time between turns, "
            "session id in the body's `user`",
            target=0.8,
        ),
        WorkloadSpec(
            "eviction-pressure",
            "shared-prefix",
            {
                "num_groups": 160,
                "system_prompt_len": 768,
                "question_len": 48,
                "output_len": 48,
                "zipf": 0.9,
            },
            "160 groups x 768-token system prompt, Zipf(0.9) popularity: the prefixes (7,680 "
            "blocks) are 1.9x the fleet's KV cache, so servers evict and a router's idea of "
            "who holds what goes stale",
            target=0.8,
        ),
        WorkloadSpec(
            "long-context",
            "sharegpt",
            {**SHAREGPT, "long_fraction": 0.05, "long_min": 3000, "long_max": 6000},
            "the sharegpt mix with 5 % of prompts 3,000-6,000 tokens long (a long prefill "
            "stalls every other sequence on its server for a step)",
        ),
        WorkloadSpec(
            "bursty",
            "sharegpt",
            SHAREGPT,
            "the sharegpt mix with bursty arrivals: Gamma gaps of shape 0.25 (coefficient of "
            "variation 2; Poisson = 1)",
            burstiness=0.25,
        ),
    )
}


DEFAULT_LOADS = (0.85,)


TARGET_LOAD = 0.85


# ----------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    family: str  # extproc | envoy | vllm-router | sglang-router
    policy: str

    @property
    def name(self) -> str:
        return f"{self.family}:{self.policy}"

    @property
    def rust(self) -> bool:
        return self.family in ("vllm-router", "sglang-router")


def all_strategies() -> list[str]:
    from extproc.strategies import STRATEGIES

    return list(STRATEGIES)


def default_strategy() -> str:
    from extproc.config import Settings

    return str(Settings.model_fields["strategy"].default)


def all_contenders() -> list[Contender]:
    return [
        *(Contender("extproc", s) for s in all_strategies()),
        Contender("envoy", "round-robin"),
        *(Contender(f, p) for f in ("vllm-router", "sglang-router") for p in routers.RUST_POLICIES),
    ]


FAMILIES = ("extproc", "envoy", "vllm-router", "sglang-router")


def contender_order(name: str) -> tuple[int, int, str]:
    """Report order: our strategies, Envoy, vllm-router, sglang-router; Rust policies in
    RUST_POLICIES order."""
    family, _, policy = name.partition(":")
    fam = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    pol = routers.RUST_POLICIES.index(policy) if policy in routers.RUST_POLICIES else 0
    return fam, pol, policy


def select_contenders(spec: str, known: Sequence[Contender]) -> list[Contender]:
    """Comma-separated names or shell patterns (``extproc:weighted``, ``sglang-router:*``); a
    bare family (``envoy``) means all of its policies; ``all`` everything. Order kept."""
    out: list[Contender] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        pattern = "*" if token == "all" else token if ":" in token else f"{token}:*"
        hits = [c for c in known if fnmatch.fnmatchcase(c.name, pattern)]
        if not hits:
            raise ValueError(
                f"no contender matches {token!r}; known: {', '.join(c.name for c in known)}"
            )
        out += [c for c in hits if c not in out]
    return out


# ----------------------------------------------------------------------------- run records
def run_path(out: Path, workload: str, contender: str, load: float, seed: int) -> Path:
    safe = contender.replace(":", "_")
    return out / RUNS_SUBDIR / workload / f"{safe}@{round(load * 100)}-seed{seed}.json"


def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for p in sorted((out / RUNS_SUBDIR).glob("*/*@*-seed*.json")):
        with contextlib.suppress(ValueError, OSError):
            d = json.loads(p.read_text())
            if d.get("format") == RUN_FORMAT:
                d["_file"] = str(p.relative_to(out))
                runs.append(d)
    return runs


def load_calibrations(out: Path) -> dict[str, dict[str, Any]]:
    cals = {}
    for p in sorted((out / RUNS_SUBDIR).glob("*/calibration.json")):
        with contextlib.suppress(ValueError, OSError):
            d = json.loads(p.read_text())
            cals[d["workload"]] = d
    return cals


SUSPECT_CLIENT_LAG_S = 0.05


SUSPECT_SIM_LAG_S = 0.05


def suspect(r: dict[str, Any]) -> bool:
    """A run the shared box may have disturbed: the client sent requests > 50 ms late (p99,
    wall), a simulator's steps ended > 50 ms late (p99) or it had to resync."""
    sim = r.get("sim", {})
    return bool(
        (r.get("client_send_lag_p99_wall_s") or 0) > SUSPECT_CLIENT_LAG_S
        or (sim.get("sim_lag_p99_wall_s") or 0) > SUSPECT_SIM_LAG_S
        or (sim.get("sim_resyncs") or 0) > 0
    )
