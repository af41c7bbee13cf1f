# Two commands on a bare machine (Python 3.11-3.14; PYTHON=python3.13 picks one): `make repro` and `make test`.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: repro test test-fast lint install tune compare

install: $(STAMP)

# constraints.txt pins every package (pip takes them from its configured index or wheel cache).
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# One id shared by every stage of this pipeline run, so MLflow can group them.
repro: $(STAMP)
	DRKD_PIPELINE_ID=$${DRKD_PIPELINE_ID:-repro-$$(date -u +%Y%m%dT%H%M%S)} dvc repro
	@cat reports/summary.md

lint: $(STAMP)
	ruff check drkd stages tests benchmarks
	mypy

test: lint
	pytest

# The inner loop: everything but the tests marked slow (real dvc repro, torchrun, studies), on
# two processes (pytest-xdist; each test takes one thread).
test-fast: lint
	pytest -m "not slow" -n 2

# Optuna study over the distillation params (not a DVC stage: a study is resumable state, not a
# function of its inputs). Run it again to continue; several workers share one study:
#   make tune TUNE_ARGS="--workers 2"            (this machine's cores shared among them)
#   make tune TUNE_ARGS="--storage postgresql://..."   (on each machine, one server)
tune: $(STAMP)
	python -m stages.tune $(TUNE_ARGS)

# Every row of params `compare.methods` (a method, or a variant of one) x every seed in
# `compare.seeds`, each cell a cached DVC stage (compare/dvc.yaml): a new row or seed runs only
# its cells. Writes
# compare/leaderboard.{md,png,json}. Not part of `make repro`.
compare: $(STAMP)
	DRKD_PIPELINE_ID=$${DRKD_PIPELINE_ID:-compare-$$(date -u +%Y%m%dT%H%M%S)} dvc repro compare/dvc.yaml
	@cat compare/leaderboard.md
