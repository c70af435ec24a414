# setsuna: every target installs what it needs into $(VENV) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These machines carry a CPU build of torch 2.13.0 on local disk; elsewhere
# set TORCH_SPEC to the build you want (a bare "torch" pulls CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= build,serve,torch,test,dev
STAMP := $(VENV)/.setsuna-installed
REPO ?= model_repository
BUILD_FLAGS ?=

.PHONY: install build-engines serve stop demo test lint perf up down compose-check clean

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

## The real tritonserver from the nvidia-pytriton wheel on the local target (Ctrl-C stops).
serve: $(STAMP)
	$(PY) -m setsuna.server --model-repository $(REPO)/local

stop:
	-pkill -TERM -f "tritonserver.*$(REPO)/local" || true

## Main job: build the engines, then predict through a local Triton server.
demo: build-engines
	$(PY) -m build_engines.demo --model-repository $(REPO)/local

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

perf: $(STAMP)
	$(PY) perf/engines.py

## Container target (needs Docker and the NGC image; not available on CI machines).
## GPU=1 adds the GPU reservation; SETSUNA_ADMIN_TOKEN must be set.
COMPOSE_FILES := -f docker-compose.yml $(if $(GPU),-f docker-compose.gpu.yml)
up:
	docker compose $(COMPOSE_FILES) up -d

down:
	docker compose $(COMPOSE_FILES) down

## Validate the compose files (Debian's docker-compose needs no Docker engine).
compose-check:
	SETSUNA_ADMIN_TOKEN=$${SETSUNA_ADMIN_TOKEN:-compose-check-token} \
		docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q

clean:
	rm -rf $(REPO)/local $(REPO)/container .cache/build
