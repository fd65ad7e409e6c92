# mlxpool — `make up` (a first look, no Kubernetes), `make demo` and `make test`. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py $(wildcard native/src/*) $(wildcard native/src/*)
	@hack/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[mlx,test]'
	touch $@

venv: $(STAMP) ## Create .venv and install mlxpool (with its native module) into it

controlplane: ## Build (or reuse) kube-apiserver, kubectl and etcd
	@hack/build-control-plane.sh

test: venv lint ## Run every test: lint, types, import contracts, native, unit, integration (real apiserver, Redis, agents)
	@hack/build-control-plane.sh >/dev/null
	$(MAKE) native-test
	$(VENV)/bin/pytest

lint: venv ## Linter (ruff), type checker (mypy) and the import contracts by layer (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo .importlinter

native-test: ## Build and run the C++ weight-manager tests with ASan/UBSan
	cmake -S native -B build/native-test -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer" >/dev/null
	cmake --build build/native-test -j2 >/dev/null
	cd build/native-test && ctest --output-on-failure

SOAK_SECONDS ?= 600
soak: venv ## Soak: mixed traffic through a router over two agents, one restart; RSS/fd/task slopes (SOAK_SECONDS=600)
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS)

demo: venv ## Bring up control plane, operator, agents and router; apply samples; ask for a completion
	@hack/build-control-plane.sh >/dev/null
	$(PY) -m mlxpool.dev.demo

MODEL ?=
AGENTS ?= 2
PORT ?= 8080
up: venv ## Agents + router on 127.0.0.1, no Kubernetes, in seconds (MODEL=dir AGENTS=2 PORT=8080; no MODEL: a tiny one)
	$(VENV)/bin/mlxpool up $(if $(MODEL),--model $(MODEL)) --agents $(AGENTS) --port $(PORT)

down: ## Stop what `make up` started
	$(VENV)/bin/mlxpool down

dev-up: venv ## `mlxpool dev up`: local control plane + operator + agents + router (leave it running)
	@hack/build-control-plane.sh >/dev/null
	$(VENV)/bin/mlxpool dev up

dev-down: ## `mlxpool dev down`
	$(VENV)/bin/mlxpool dev down

KUBECTL ?= kubectl
install: ## Install the CRDs into the cluster of KUBECONFIG
	$(KUBECTL) apply -k crds

uninstall: ## Remove the CRDs (and every mlxpool object) from the cluster of KUBECONFIG
	$(KUBECTL) delete -k crds --ignore-not-found

deploy: ## Deploy CRDs, RBAC and the operator (manifests/default) to the cluster of KUBECONFIG
	$(KUBECTL) apply -k manifests/default

undeploy: ## Remove what `make deploy` created
	$(KUBECTL) delete -k manifests/default --ignore-not-found

crd-reference: venv ## Regenerate docs/crd-reference.md from the schemas in crds/ (a test fails when it is stale)
	$(PY) -m mlxpool.dev.crdref

api-reference: venv ## Regenerate docs/api-reference.md and docs/openapi/*.json from a real agent's and router's /openapi.json
	$(PY) -m mlxpool.dev.apiref

clean: ## Remove build outputs and local state (not the cached control plane binaries)
	rm -rf build .mlxpool .pytest_cache

.PHONY: help venv controlplane test lint native-test demo up down dev-up dev-down install uninstall deploy undeploy crd-reference api-reference clean
