# Set-up is part of every target: a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; pinned for installs here so that pip never pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PROMPT ?= Explain what a hash table is and how it handles collisions.

.PHONY: demo test lint setup clean

$(BIN)/clasp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/clasp

demo: setup
	$(BIN)/clasp generate --method clasp --compare "$(PROMPT)"
	$(BIN)/clasp generate --compare "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
