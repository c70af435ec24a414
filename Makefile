# setsuna: every target installs what it needs into $(VENV) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These machines carry a CPU build of torch 2.13.0 on local disk; elsewhere
# set TORCH_SPEC to the build you want (a bare "torch" pulls CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= build,serve,torch,test,dev,perf,features,data,postgres
STAMP := $(VENV)/.setsuna-installed
REPO ?= model_repository
BUILD_FLAGS ?=
PERF_FLAGS ?=

.PHONY: install build-engines serve stop demo test lint perf perf-setup perf-peers reliability image up down compose-check k8s-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

## Train the example models, build every candidate, gate them, write both targets.
build-engines: $(STAMP)
	$(PY) -m build_engines --target all --out $(REPO) $(BUILD_FLAGS)
	$(PY) -m ensembles --model-repository $(REPO)/local

## The real tritonserver from the nvidia-pytriton wheel on the local target (Ctrl-C stops).
serve: $(STAMP)
	$(PY) -m setsuna.server --model-repository $(REPO)/local

stop: $(STAMP)
	$(PY) -m setsuna.server --stop --model-repository $(REPO)/local

## Main job: build the engines, then replay unseen real market data through the pipeline.
demo: build-engines
	$(PY) -m demo --model-repository $(REPO)/local

test: $(STAMP) perf-setup
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## perf_analyzer from the tritonclient 2.47.0 wheel (+ libb64-0d, libcudart) into .cache/perf_analyzer.
perf-setup: $(STAMP)
	PY=$(PY) bash perf/setup_perf_analyzer.sh

## Engine benchmark, then the Triton config sweep (needs `make build-engines`; ~10-15 min):
## writes .cache/perf/ and merges the chosen settings into build_engines/tuning/tuned.json.
perf: $(STAMP) perf-setup
	$(PY) perf/engines.py
	test -f $(REPO)/local/lightgbm/config.pbtxt || $(MAKE) build-engines
	$(PY) -m build_engines.tuning --model-repository $(REPO)/local $(PERF_FLAGS)
	$(PY) -m perf.targets --model-repository $(REPO)/local
	$(PY) -m perf.ensembles --model-repository $(REPO)/local --rounds 5
	$(PY) perf/features.py

## The model pool (setsuna.pool): cold loads per engine kind, evicted vs loaded first
## requests, memory against the budget under Zipf traffic over 50 models (~4 min, not CI).
POOL_FLAGS ?=
.PHONY: perf-pool
perf-pool: $(STAMP)
	$(PY) -m perf.pool $(POOL_FLAGS)

## A morning's deployment of lightgbm (publish, shadow, compare, canary 10 %, promote,
## rollback) on a copy of the built repository under decide at c=8 (~1.5 min, not CI).
.PHONY: perf-lifecycle
perf-lifecycle: $(STAMP)
	$(PY) -m perf.lifecycle --model-repository $(REPO)/local

## One SDK client over 1, 2 and 3 local replicas on the same 2 cores: balancing overhead,
## kill -9 failover and rejoin, hedging against an artificially slow replica (~2 min, not CI).
REPLICAS_FLAGS ?=
.PHONY: perf-replicas
perf-replicas: $(STAMP)
	$(PY) -m perf.replicas $(REPLICAS_FLAGS)

## Hardening probes against a real local tritonserver (tiny models in a temp dir; ~1 min, not CI):
## prints probe | expected | observed | verdict, writes .cache/reliability/, exits 1 on a FAIL.
reliability: $(STAMP)
	$(PY) -m reliability

# Peer servers for perf-peers live in their own venv, never in $(VENV) nor CI.
# mlserver 1.7.1 needs fastapi<0.116 and ray[serve]>=2.56 needs a newer one
# (pip then backtracks through ~75 MB ray wheels): ray is pinned below 2.56.
# uvloop 0.22+ raises in MLServer's inference workers (get_event_loop).
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.setsuna-peers-installed
PEERS_SPECS := "mlserver>=1.7.1" "mlserver-lightgbm>=1.7.1" "ray[serve]>=2.55.1,<2.56" \
	"fastapi>=0.115,<0.116" "uvicorn>=0.30" "uvloop>=0.19,<0.22" "nvidia-pytriton>=0.7" \
	"lightgbm>=4.3" "onnxruntime>=1.18" "numpy>=1.24,<2" "aiohttp>=3.9" "httpx>=0.27" \
	"psutil>=5.9"
PEERS_FLAGS ?=

$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q -e ".[build,serve]" $(PEERS_SPECS)
	touch $@

## The same LightGBM model behind setsuna, PyTriton, MLServer, Ray Serve, FastAPI (~5 min, not CI).
perf-peers: $(PEERS_STAMP)
	test -f $(REPO)/local/lightgbm/config.pbtxt || $(MAKE) build-engines
	$(PEERS_PY) -m perf.peers --model-repository $(REPO)/local $(PEERS_FLAGS)

## Container target (needs Docker and the NGC image; not available on CI machines).
## setsuna's image: the whole stack built inside the NGC image, sealed with the
## publisher's key passed as a BuildKit secret (never a layer). IMAGE_FLAGS: e.g.
## --build-arg SETSUNA_BUILD_FLAGS="--small".
IMAGE ?= setsuna/tritonserver:24.10-py3
SIGNING_KEY ?= $(or $(SETSUNA_SIGNING_KEY),$(HOME)/.config/setsuna/signing_key)
IMAGE_FLAGS ?=
image:
	test -f "$(SIGNING_KEY)" || { echo "no signing key at $(SIGNING_KEY): set SIGNING_KEY" >&2; exit 2; }
	DOCKER_BUILDKIT=1 docker build -f deploy/container/Dockerfile -t $(IMAGE) \
		--secret id=setsuna_signing_key,src="$(SIGNING_KEY)" $(IMAGE_FLAGS) .

## GPU=1 adds triton-gpu (model_repository/container-gpu on the GPU); SETSUNA_ADMIN_TOKEN must be set.
COMPOSE_FILES := -f docker-compose.yml $(if $(GPU),-f docker-compose.gpu.yml)
up: image
	docker compose $(COMPOSE_FILES) up -d

down:
	docker compose $(COMPOSE_FILES) down

## Validate the compose files (Debian's docker-compose needs no Docker engine).
compose-check:
	SETSUNA_ADMIN_TOKEN=$${SETSUNA_ADMIN_TOKEN:-compose-check-token} \
		docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q

## Render deploy/k8s with kubectl kustomize, schema-check it for Kubernetes 1.30 and check
## Triton's args against ServerSettings (no cluster needed).
k8s-check: $(STAMP)
	$(PY) -m setsuna.k8s --check
	$(PY) -m pytest -q tests/deploy/test_k8s.py

clean:
	rm -rf $(REPO)/local $(REPO)/container $(REPO)/container-gpu .cache/build
