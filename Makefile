# `make test` works on a fresh clone: it creates .venv, installs torch first (a CPU build
# from the pinned spec; override with TORCH_SPEC=...), then the package with its dev extra.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# About three minutes of CPU training on text that ships with Python, then a sample.
demo: $(STAMP)
	$(BIN)/python scripts/make_demo_corpus.py demo/corpus.txt
	$(BIN)/tformer train demo/corpus.txt -o demo/run --preset micro --time 3m --overwrite --eval-every 200

LINTED := models tformer_cli tests benchmarks scripts

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) build *.egg-info demo
