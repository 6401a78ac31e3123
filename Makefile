# cellulib and the Cellularity Book.  `make book` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cellulib-installed
PROFILE ?= quick
SEED ?= 0
PORT ?= 8888
SOLUTIONS ?= show
# Test processes (pytest-xdist): each test file runs whole in one of them, and tests/conftest.py
# shares the cores among them (one torch thread each on these 2-core machines). TEST_JOBS=0 runs
# the suite in this process.
TEST_JOBS ?= 2
# The kernel the chapters name in their metadata (cellulib.bench.lab.KERNEL_NAME), registered in $(VENV).
KERNEL := cellulib
KERNELSPEC := $(VENV)/share/jupyter/kernels/$(KERNEL)/kernel.json

export NO_ALBUMENTATIONS_UPDATE := 1
# Generated data and cached models live here (ignored by git).
export CELLULIB_HOME ?= $(CURDIR)/data

# Install with pip from the package registry only.  Some machines carry a local CPU-only torch wheel
# in pip's find-links; pip would prefer it, and the registry's torchvision does not import with it
# ("operator torchvision::nms does not exist"), so pip's configuration files and find-links are ignored.
PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip

CHAPTERS := $(sort $(notdir $(wildcard notebooks/[0-9][0-9]*_*.ipynb)))
EXECUTED := $(addprefix book/chapters/,$(CHAPTERS))
LIBRARY := $(wildcard cellulib/*.py cellulib/*/*.py)

.PHONY: help install data chapters exercises book lab test lint bench clean distclean

help:
	@echo "make book   - environment, synthetic data, executed chapters, HTML book in _build/html"
	@echo "make test   - environment, then the test suite"
	@echo "make lab    - the chapter sources in JupyterLab with the project's kernel (PORT=8888)"
	@echo "make exercises - every chapter with the exercises' quick parameters, timed for teachers"
	@echo "make lint   - ruff and notebook checks"
	@echo "make bench  - the benchmark suite (python -m cellulib.bench --quick)"
	@echo "make clean  - remove executed chapters and the built book (keeps .venv and data)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c constraints.txt -e ".[book,test]"
	@touch $@

# The project's kernel, registered inside the environment (what `ipykernel install --sys-prefix`
# does), so papermill and JupyterLab both find it.
$(KERNELSPEC): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cellulib)"
	@touch $@

install: $(STAMP) $(KERNELSPEC)

data: $(STAMP)
	$(PY) -m cellulib synth --profile $(PROFILE) --seed $(SEED)

# papermill executes each chapter into book/chapters/ (written to a temporary file first, so a failed
# run never leaves a half-executed chapter behind, and the failed copy stays beside it to read).
# Then its parameters are folded into one collapsed block, and with SOLUTIONS=hide the exercises'
# solutions are removed from the executed copy.
book/chapters/%.ipynb: notebooks/%.ipynb $(STAMP) $(KERNELSPEC) $(LIBRARY)
	@mkdir -p book/chapters
	@echo "== executing $< (profile=$(PROFILE), seed=$(SEED))"
	@start=$$(date +%s); \
	if $(PY) -m papermill --cwd book/chapters -p profile $(PROFILE) -p seed $(SEED) $< $@.tmp.ipynb; then \
		$(PY) -m cellulib.bench.bookstatus --fold $@.tmp.ipynb $(if $(filter hide,$(SOLUTIONS)),&& \
		$(PY) -m cellulib.bench.bookstatus --hide-solutions $@.tmp.ipynb) && \
		mv $@.tmp.ipynb $@ && echo "== $@ done in $$(( $$(date +%s) - start )) s"; \
	else \
		echo "== FAILED: chapter $< (papermill's copy with the error: $@.tmp.ipynb)"; exit 1; \
	fi

# The status page, the build history ($(CELLULIB_HOME)/book-history.json) and the teachers' page.
chapters: data $(EXECUTED)
	$(PY) -m cellulib.bench.bookstatus --chapters book/chapters --notebooks notebooks \
		--out book/chapters/status.md --teachers book/chapters/teachers.md

# Every chapter with the exercises' parameters (cellulib.bench.bookstatus.EXERCISE_PARAMETERS) into
# book/exercises/, their times recorded for the teachers' page.
exercises: data $(KERNELSPEC)
	$(PY) -m cellulib.bench.bookstatus --execute-exercises book/exercises --notebooks notebooks \
		--profile $(PROFILE) --seed $(SEED) --chapters book/chapters --teachers book/chapters/teachers.md

book: chapters
	@start=$$(date +%s); \
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going && \
	echo "== book built in $$(( $$(date +%s) - start )) s: open _build/html/index.html"

test: $(STAMP) $(KERNELSPEC)
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

# JupyterLab on 127.0.0.1:$(PORT), rooted here, opening notebooks/ (the port is checked first).
lab: $(STAMP) $(KERNELSPEC)
	$(PY) -m cellulib.bench.lab --port $(PORT)

bench: $(STAMP)
	$(PY) -m cellulib.bench --quick

lint: $(STAMP)
	$(PY) -m ruff check cellulib tests
	$(PY) -m pytest -q tests/test_repo.py

clean:
	rm -rf _build book/chapters book/exercises

distclean: clean
	rm -rf $(VENV) data
