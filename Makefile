# Set-up and everyday commands. Everything installs into ./.venv, so a fresh clone needs only
# python3 (>= 3.10) and make. Override TORCH to pick a build, e.g. TORCH="torch==2.13.0+cu126".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with everything needed to train, serve and test

run: $(STAMP)  ## the main job (see README)
	$(BIN)/mnemo demo

test: $(STAMP)  ## lint + the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
