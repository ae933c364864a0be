"""The simulator's /metrics must look like real vLLM's: same families, types, HELP, label names,
enumerated label values and histogram buckets as the captures in tests/fixtures."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vllmsim.exposition import Exposition, HttpStats

from .conftest import FIXTURES, make_engine, run_until

FIXTURE_FILES = (
    "vllm-metrics-real.txt",
    "vllm-metrics-real-busy.txt",
    "vllm-metrics-real-queued.txt",
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# labels whose values are an enumeration the router may rely on
ENUM_LABELS = {"reason", "source", "finished_reason", "sleep_state"}


@dataclass
class Family:
    type: str = ""
    help: str = ""
    label_names: dict[str, set[frozenset[str]]] = field(default_factory=lambda: defaultdict(set))
    enum_values: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    buckets: list[str] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    fams: dict[str, Family] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            fams.setdefault(name, Family()).help = help_
            current = name
        elif line.startswith("# TYPE "):
            name, _, typ = line[7:].partition(" ")
            fams.setdefault(name, Family()).type = typ
            current = name
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"unparsable sample line: {line!r}"
            name, labels = m.group(1), dict(_LABEL.findall(m.group(2) or ""))
            fam = fams[current]
            fam.label_names[name].add(frozenset(labels))
            for k, v in labels.items():
                if k in ENUM_LABELS:
                    fam.enum_values[k].add(v)
            if name.endswith("_bucket") and "le" in labels:
                if labels["le"] not in fam.buckets:
                    fam.buckets.append(labels["le"])
            float(m.group(3))
    return fams


def busy_sim_page(lora: bool = False) -> str:
    """A page after real traffic: finished requests, one preemption, prefix hits."""
    kw = {"lora_modules": ("ad",), "max_loras": 1} if lora else {}
    eng = make_engine(num_gpu_blocks=9, max_model_len=64, **kw)
    reqs = []
    for i in range(4):
        r = eng.make_request(
            f"r{i}",
            list(range(i % 2, 20 + i % 2)),
            30,
            ignore_eos=True,
            lora="ad" if lora and i == 3 else None,
        )
        eng.add_request(r)
        reqs.append(r)
    run_until(eng, lambda: all(r.done for r in reqs))
    assert eng.stats.preemptions > 0 and eng.stats.prefix_hits > 0
    http = HttpStats()
    http.record("/v1/completions", "POST", 200, 100, 400, 0.2)
    http.record("/v1/chat/completions", "POST", 200, 100, 0, 0.3)
    http.record("/v1/completions", "POST", 400, 90, 200, 0.01)
    return Exposition(eng.cfg, eng, http).render()


@pytest.fixture(scope="module")
def sim() -> dict[str, Family]:
    return parse(busy_sim_page())


@pytest.mark.parametrize("fixture", FIXTURE_FILES)
def test_families_match_fixture(fixture: str, sim: dict[str, Family]) -> None:
    real = parse(Path(FIXTURES, fixture).read_text())
    real_vllm = {n for n in real if n.startswith("vllm:")}
    sim_vllm = {n for n in sim if n.startswith("vllm:")}
    assert real_vllm == sim_vllm, (
        f"missing {sorted(real_vllm - sim_vllm)}, extra {sorted(sim_vllm - real_vllm)}"
    )
    missing_other = {n for n in real if not n.startswith("vllm:")} - set(sim)
    assert not missing_other, f"missing non-vllm families {sorted(missing_other)}"
    for name, rf in real.items():
        sf = sim[name]
        assert sf.type == rf.type, name
        assert sf.help == rf.help, name
        if not name.startswith("vllm:"):
            continue
        assert sf.buckets == rf.buckets, f"{name}: buckets differ"
        for sample, label_sets in rf.label_names.items():
            assert sf.label_names.get(sample) == label_sets, f"{sample}: label names differ"
        assert dict(sf.enum_values) == dict(rf.enum_values), f"{name}: label values differ"


def test_every_vllm_sample_carries_engine_and_model_name(sim: dict[str, Family]) -> None:
    for name, fam in sim.items():
        if not name.startswith("vllm:") or name.startswith(
            ("vllm:admission_rejections", "vllm:cache_config_info")
        ):
            continue  # real vLLM: model_name only / engine only on these two
        for sample, label_sets in fam.label_names.items():
            for labels in label_sets:
                assert {"engine", "model_name"} <= labels, sample


def test_cache_config_info_values() -> None:
    text = busy_sim_page()
    line = next(ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{"))
    labels = dict(_LABEL.findall(line))
    assert labels["block_size"] == "16" and labels["num_gpu_blocks"] == "9"
    assert labels["enable_prefix_caching"] == "True" and labels["engine"] == "0"
    assert labels["kv_cache_size_tokens"] == str(9 * 16)


def test_lora_requests_info_in_vllm_format() -> None:
    fams = parse(busy_sim_page(lora=True))
    fam = fams["vllm:lora_requests_info"]
    assert fam.type == "gauge"
    assert fam.label_names["vllm:lora_requests_info"] == {
        frozenset({"max_lora", "running_lora_adapters", "waiting_lora_adapters"})
    }
    text = busy_sim_page(lora=True)
    values = [
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("vllm:lora_requests_info{")
    ]
    import time

    assert values and all(abs(v - time.time()) < 60 for v in values)  # a timestamp
