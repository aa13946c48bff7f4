# edgefleet operations. `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEFLEET := $(VENV)/bin/edgefleet
STAMP := $(VENV)/.installed-stamp
PEERS_STAMP := $(VENV)/.bench-peers-stamp
PYTEST_ARGS ?=
SCENARIO ?=
FULL ?=
NODE_ARGS ?=
NODES ?= 2
PROMPT ?= Write a haiku about a lighthouse.
COORDINATOR ?=
SESSION ?=
NODE ?=
UNDO ?=

.PHONY: help install demo fleet status chat drain etcd traces test chaos lint format proto node bench bench-failover clean
.PHONY: bundle bundle-test join-line portable
.PHONY: image containers compose-up compose-down

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## venv, llama-cpp-python (cached build), edgefleet[dev], default model

$(STAMP): pyproject.toml deploy/install.sh
	VENV=$(VENV) ./deploy/install.sh
	@touch $@

demo: install  ## the main job: a local fleet (etcd, coordinator, 2 nodes) and a chat through it
	$(EDGEFLEET) up --nodes 2 --chat "$(PROMPT)"

fleet: install  ## run a local fleet until Ctrl-C (NODES=2)
	$(EDGEFLEET) up --nodes $(NODES)

status: install  ## the fleet's nodes (COORDINATOR=host:port to pick one)
	$(EDGEFLEET) status $(if $(COORDINATOR),--coordinator $(COORDINATOR))

chat: install  ## chat through the fleet (PROMPT="..."; SESSION=id to continue one)
	$(EDGEFLEET) chat $(if $(COORDINATOR),--coordinator $(COORDINATOR)) $(if $(SESSION),--session $(SESSION)) $(if $(PROMPT),"$(PROMPT)")

drain: install  ## stop new sessions going to NODE=id (UNDO=1 to resume)
	@test -n "$(NODE)" || (echo "usage: make drain NODE=node-id [UNDO=1]"; exit 2)
	$(EDGEFLEET) drain $(NODE) $(if $(UNDO),--undo) $(if $(COORDINATOR),--coordinator $(COORDINATOR))

traces: install  ## a local fleet with tracing: one chat, its span tree printed (saved to trace.json)
	$(EDGEFLEET) traces

etcd: install  ## a standalone local etcd server until Ctrl-C
	$(EDGEFLEET) etcd

test: install  ## the whole test suite (real processes, real model)
	$(PY) -m pytest $(PYTEST_ARGS)

chaos: install  ## the fault-injection suite alone (kill -9, SIGSTOP, etcd member loss, partition)
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

lint: install  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: install  ## regenerate the gRPC stubs in edgefleet/v1 from proto/
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/edgefleet/v1/*.proto

node: install  ## run one node on the default model (Ctrl-C to stop)
	$(EDGEFLEET) node $(NODE_ARGS)

bench: $(PEERS_STAMP)  ## benchmark suite: JSON + PNG + table in bench-results/ (SCENARIO=name, FULL=1)
	$(PY) -m bench $(SCENARIO) $(if $(FULL),--full)

$(PEERS_STAMP): $(STAMP)
	deploy/install.sh --bench-peers
	touch $@

bench-failover: install  ## failover under load: kill -9 / SIGSTOP nodes and a coordinator mid-stream (FULL=1)
	$(PY) -m bench failover $(if $(FULL),--full)

# Containers (README: Deploy, "Containers"). BASE_IMAGE=name to build on another
# base, OFFLINE=1 to fetch nothing inside the build, ENGINE=docker; COMPOSE_HOST=1
# runs the compose fleet on the host network. CONTAINERS_CONF=deploy/container/containers.conf
# on sandboxes like the developers' machines (runc, no ulimits, host network).
BASE_IMAGE ?=
OFFLINE ?=
COMPOSE ?= $(shell command -v podman-compose >/dev/null 2>&1 && echo podman-compose || echo docker compose)
COMPOSE_FILES = -p edgefleet -f deploy/compose.yaml $(if $(COMPOSE_HOST),-f deploy/compose.host.yaml)
VOLUMES ?=

image: install  ## container images edgefleet-node and edgefleet-coordinator (BASE_IMAGE=, OFFLINE=1)
	$(if $(BASE_IMAGE),BASE_IMAGE=$(BASE_IMAGE)) $(if $(OFFLINE),OFFLINE=1) deploy/container/build.sh

containers: install  ## build the images here and test them: node containers join, serve, survive kill (podman)
	$(PY) -m pytest -m containers tests/test_containers.py $(PYTEST_ARGS)

compose-up: image  ## a fleet in containers: 3 etcd, 2 coordinators, 2 nodes (COMPOSE_HOST=1: host network)
	$(COMPOSE) $(COMPOSE_FILES) up -d

compose-down:  ## stop the compose fleet (VOLUMES=1 also deletes its volumes)
	$(COMPOSE) $(COMPOSE_FILES) down $(if $(VOLUMES),-v)

# Devices (README: Deploy, "Offline bundle" and "One line from the coordinator").
MODELS ?= smollm2-135m
ARCH ?=
USES ?= 1
APPROVE ?=

portable:  ## portable llama-cpp-python wheel for bundles (every CPU variant, chosen at run time; ~25 min on 2 cores) in .venv-portable
	PORTABLE=1 VENV=.venv-portable ./deploy/install.sh

bundle: install  ## offline node bundle edgefleet-node-VERSION-ARCH.tar.gz (MODELS=a,b ARCH=)
	$(EDGEFLEET) bundle --models $(MODELS) $(if $(ARCH),--arch $(ARCH))

bundle-test: install  ## build the real bundle, install it offline, join, chat, upgrade
	$(PY) -m pytest -m bundle tests/test_bundle.py $(PYTEST_ARGS)

join-line: install  ## print a device's one-line install with a new token (USES=1, APPROVE=1)
	@$(EDGEFLEET) token create --join-line --uses $(USES) $(if $(APPROVE),--approve) $(if $(COORDINATOR),--coordinator $(COORDINATOR))

clean:  ## remove the venv and caches (not the model store or the wheel cache)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
