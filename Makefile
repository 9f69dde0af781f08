# reelstream: local development. `make help` lists the targets.
#
# A fresh clone needs only `make up` or `make test`: both create the virtualenv and
# fetch the ML-100K data first. Nothing downloads at run time (HF_HUB_OFFLINE=1).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory
.DELETE_ON_ERROR:

PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Written after a successful install; remade when the pinned dependencies change.
VENV_STAMP := $(VENV)/.reelstream-installed
DATA_DIR := data/ml-100k
DATA_STAMP := $(DATA_DIR)/ml-100k.inter

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# make replay LIMIT=5000 RATE=1000 TIME_SCALE=3600: each is passed on only when set.
REPLAY_ARGS := $(if $(LIMIT),--limit $(LIMIT)) $(if $(RATE),--rate $(RATE)) \
	$(if $(TIME_SCALE),--time-scale $(TIME_SCALE))

.PHONY: help venv data up down status recs dead-letters replay test test-fast lint doors bench chaos eval eval-stream train \
	ablation up-docker down-docker clean distclean

help: ## list the targets
	@echo "usage: make <target>   (replay takes LIMIT=, RATE=, TIME_SCALE=)"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## create .venv and install the project with its pinned dependencies

# torch and its CUDA libraries are big wheels: the first install takes a while
# (pip finds them in the configured local wheel folders when there is no internet).
$(VENV_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	@echo "installing reelstream into $(VENV) (pinned by constraints.txt)..."
	@$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

data: $(DATA_STAMP) ## fetch the MovieLens-100K data into data/ml-100k

$(DATA_STAMP): | $(VENV_STAMP)
	@$(PY) -m infra.data --dest $(DATA_DIR)

up: venv data ## under supervisord: the broker (if none runs) and the four services; wait until ready
	@$(PY) -m infra.stack up

down: ## stop the services, the broker if `make up` started it, and supervisord
	@if [ -x $(PY) ]; then $(PY) -m infra.stack down; fi

status: venv ## supervisord's state of each program (restarts, uptime), readiness, consumer lag
	@$(PY) -m infra.stack status

recs: venv ## follow the recommendation lists as they are published
	@$(PY) -m infra.stack tail

dead-letters: venv ## print the dead letters (service, source, reason, payload), then follow new ones
	@$(PY) -m infra.stack dead-letters

replay: venv data ## replay ML-100K into the running stack (LIMIT=, RATE=, TIME_SCALE=)
	@$(PY) -m services.ingest replay --dataset $(DATA_DIR) $(REPLAY_ARGS)

test: venv data ## the whole test suite, slow and integration tests included
	@$(PY) -m pytest -q

test-fast: venv data ## the test suite without the slow tests
	@$(PY) -m pytest -q -m "not slow"

lint: venv ## ruff (lint and format check) and mypy
	@$(VENV)/bin/ruff check --quiet .
	@$(VENV)/bin/ruff format --check --quiet .
	@$(VENV)/bin/mypy --no-error-summary shared services infra

doors: venv ## where the code crosses the layout's one-way doors (imports that point the wrong way)
	@$(PY) -m infra.doors

bench: venv data ## idle CPU, catalogue, ceiling, full speed, steady rates, RSS on the running stack (LIMIT=, RATES=, STEADY_S=, INSTANCES=)
	@$(PY) -m infra.bench --json reports/bench$(if $(filter-out 1,$(INSTANCES)),-x$(INSTANCES)).json \
		$(if $(LIMIT),--limit $(LIMIT)) $(if $(filter command line,$(origin RATES)),--rates "$(RATES)") \
		$(if $(STEADY_S),--steady-s $(STEADY_S)) $(if $(INSTANCES),--instances $(INSTANCES))

chaos: venv data ## kill -9 services, restart the broker mid-replay; compare to an undisturbed run (LIMIT=, RATE=)
	@$(PY) -m infra.chaos --json reports/chaos.json --limit $(or $(LIMIT),10000) \
		--rate $(or $(RATE),200)

train: venv data ## train the item encoder, user updater and ranker on TRAIN into models/
	@$(PY) -m infra.lab.train

ablation: venv data ## item-encoder ablation ladder on the validation split; reports/ablation.*
	@$(PY) -m infra.lab.ablation

eval: venv data ## protocol T1 in process, every model; reports/ (TEST_LIMIT=, VALIDATION=1)
	@$(PY) -m infra.lab.eval run $(if $(TEST_LIMIT),--test-limit $(TEST_LIMIT)) \
		$(if $(VALIDATION),--validation)

eval-stream: venv data ## T1 through the running stack vs in process (TEST_LIMIT=1000, VARIANT=)
	@$(PY) -m infra.lab.eval stream --test-limit $(or $(TEST_LIMIT),1000) $(if $(VARIANT),--variant $(VARIANT))

up-docker: ## the stack in Docker: Apache Kafka, Qdrant and the services
	docker compose up -d --build

down-docker: ## stop the Docker stack
	docker compose down

clean: down ## stop the stack, remove var/ (broker data, logs, Qdrant) and caches
	@rm -rf var .pytest_cache .mypy_cache .ruff_cache build
	@find shared services infra tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and the downloaded data
	@rm -rf $(VENV) data
