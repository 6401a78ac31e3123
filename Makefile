# cellulib and the Cellularity Book.  `make book` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cellulib-installed
PROFILE ?= quick
SEED ?= 0

export NO_ALBUMENTATIONS_UPDATE := 1
# Generated data and cached models live here (ignored by git).
export CELLULIB_HOME ?= $(CURDIR)/data

# Install with pip from the package registry only.  Some machines carry a local CPU-only torch wheel
# in pip's find-links; pip would prefer it, and the registry's torchvision does not import with it
# ("operator torchvision::nms does not exist"), so pip's configuration files and find-links are ignored.
PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip

CHAPTERS := $(sort $(notdir $(wildcard notebooks/[0-9][0-9]*_*.ipynb)))
EXECUTED := $(addprefix book/chapters/,$(CHAPTERS))
LIBRARY := $(wildcard cellulib/*.py)

.PHONY: help install data chapters book test lint bench clean distclean

help:
	@echo "make book   - environment, synthetic data, executed chapters, HTML book in _build/html"
	@echo "make test   - environment, then the test suite"
	@echo "make lint   - ruff and notebook checks"
	@echo "make bench  - the benchmark suite (python -m cellulib.bench --quick)"
	@echo "make clean  - remove executed chapters and the built book (keeps .venv and data)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c constraints.txt -e ".[book,test]"
	@touch $@

install: $(STAMP)

data: $(STAMP)
	$(PY) -m cellulib synth --profile $(PROFILE) --seed $(SEED)

# papermill executes each chapter into book/chapters/ (written to a temporary file first, so a failed
# run never leaves a half-executed chapter behind).
book/chapters/%.ipynb: notebooks/%.ipynb $(STAMP) $(LIBRARY)
	@mkdir -p book/chapters
	@echo "== executing $< (profile=$(PROFILE), seed=$(SEED))"
	@start=$$(date +%s); \
	$(PY) -m papermill --cwd book/chapters -p profile $(PROFILE) -p seed $(SEED) $< $@.tmp.ipynb && \
	mv $@.tmp.ipynb $@ && echo "== $@ done in $$(( $$(date +%s) - start )) s"

chapters: data $(EXECUTED)
	$(PY) -m cellulib.bookstatus --chapters book/chapters --notebooks notebooks --out book/chapters/status.md

book: chapters
	@start=$$(date +%s); \
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going && \
	echo "== book built in $$(( $$(date +%s) - start )) s: open _build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m cellulib.bench --quick

lint: $(STAMP)
	$(PY) -m ruff check cellulib tests
	$(PY) -m pytest -q tests/test_repo.py

clean:
	rm -rf _build book/chapters

distclean: clean
	rm -rf $(VENV) data
