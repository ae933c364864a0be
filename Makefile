# Two commands matter: `make run` and `make test`. Both set up the venv from pyproject.toml first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv bench-parse bench-overhead bench-routing bench-decision clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m devstack

test: $(STAMP)
	$(PY) -m pytest -q

bench-parse: $(STAMP)
	$(PY) bench/bench_parse.py

bench-decision: $(STAMP)
	$(PY) bench/bench_decision.py

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-overhead: $(BENCH_STAMP)
	$(PY) bench/bench_overhead.py $(ARGS)

bench-routing: $(BENCH_STAMP)
	$(PY) bench/bench_routing.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
