# Set-up and everyday commands. Everything installs into ./.venv, so a fresh clone needs only
# python3 (>= 3.11) and make. Override TORCH to pick a build, e.g. TORCH="torch==2.13.0+cu126".
PYTHON ?= python3
VENV ?= .venv
DEFAULT_TORCH := torch==2.13.0
TORCH ?= $(DEFAULT_TORCH)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: FORCE install run demo-bundle test browser haproxy format clean docker docker-test

# Installed again when pyproject.toml changes, or when a TORCH given to make (command line or environment)
# names another build than .venv holds (.venv/.torch; a .venv without it holds the default).
INSTALLED_TORCH = $(or $(shell cat $(VENV)/.torch 2>/dev/null),$(DEFAULT_TORCH))
$(STAMP): pyproject.toml $(if $(and $(filter-out file,$(origin TORCH)),$(filter-out $(TORCH),$(INSTALLED_TORCH))),FORCE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[train,dev]"
	echo "$(TORCH)" > $(VENV)/.torch
	touch $(STAMP)

FORCE:

install: $(STAMP)  ## create .venv with everything needed to train, serve and test

run: $(STAMP)  ## the main job: serve the bundles in ./bundles (the default one ships with the repo)
	$(BIN)/mnemo serve --model-dir bundles

demo-bundle: $(STAMP)  ## rebuild the shipped default bundle bundles/brick from scratch (~2 min on CPU)
	$(BIN)/mnemo demo --out runs/demo --bundle bundles/brick

test: $(STAMP) browser haproxy  ## lint + the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# Headless Chromium for the upload-page test: installed with apt when running as root, else that test skips.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and not root: the upload-page test will be skipped"; fi; }

# HAProxy for the failover test (two replicas, one killed under load): as chromium above.
haproxy:
	@command -v haproxy >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
	  else echo "haproxy not installed and not root: the failover test will be skipped"; fi; }

docker:  ## build the CPU image mnemo:cpu (ONNX Runtime, no torch; needs BuildKit)
	DOCKER_BUILDKIT=1 docker build -t mnemo:cpu .

docker-test: $(STAMP)  ## CI's Docker stage: build, compose up, score, Prometheus (root; installs docker.io)
	PYTHON=$(BIN)/python docker/ci-test.sh

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
