# Every target creates .venv if missing and installs everything from scratch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tracekit.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_replay.py --out docs/benchmarks.md
	$(BIN)/tracekit record --model tiny-mixtral --max-new-tokens 48 --batch-size 4 --hidden full \
		--out traces/demo-tiny-mixtral.parquet --force --no-progress
	$(BIN)/python bench/replay_results.py --out docs/results.md --extra traces/demo-tiny-mixtral.parquet

lint: $(STAMP)
	$(BIN)/ruff check tracekit cli tests bench

clean:
	rm -rf $(VENV) .numba_cache build *.egg-info
