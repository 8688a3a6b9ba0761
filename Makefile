# The README's two commands: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project with pinned dev constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Optional extras on top of dev; CI adds triton so the Triton kernels' interpreter tests run.
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test lint format install benchmark clean

$(STAMP): pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; an unpinned resolve would pull CUDA builds.
	$(PY) -m pip install -q -c constraints-dev.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/axial-deeplab demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15

# ruff: lint (pycodestyle, pyflakes, import order) and the formatter's check; settings in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

benchmark: $(STAMP)
	$(VENV)/bin/axial-deeplab benchmark --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
