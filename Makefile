# stockpot: `make demo` runs the main job, `make test` the test suite. Each
# installs what it needs first (Debian's dataset-fashion-mnist, a virtualenv
# from the pinned requirements.txt, the TFDS build of Fashion-MNIST), and
# every step is skipped when already done.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TFDS_DATA_DIR ?= $(HOME)/tensorflow_datasets
FMNIST_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FMNIST_TFDS := $(TFDS_DATA_DIR)/fashion_mnist/3.0.1/dataset_info.json
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint deps data bench-train clean-demo

demo: data
	$(PY) -m launch.demo --out=runs/demo

# Two pytest-xdist workers, whole files each (files share session fixtures): most
# tests wait on process starts and compiles, so two keep both cores busy.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test: data lint
	$(PYTEST) tests

test-fast: data lint
	$(PYTEST) tests -m "not slow"

# ruff (pinned in requirements.txt, settings in pyproject.toml): seconds, before any test.
lint: deps
	$(VENV)/bin/ruff check .

deps: $(VENV)/.installed $(FMNIST_DEB)

data: deps $(FMNIST_TFDS)

$(FMNIST_DEB):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

$(VENV)/.installed: requirements.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(FMNIST_TFDS): | $(VENV)/.installed $(FMNIST_DEB)
	$(PY) -m train.packaged_data --data_dir=$(TFDS_DATA_DIR)

# The trainer benchmark's PyTorch peer lives in its own venv: stockpot never imports torch.
BENCH_VENV := .venv-bench

$(BENCH_VENV)/.installed: bench/requirements-peer.txt
	[ -x $(BENCH_VENV)/bin/python ] || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements-peer.txt
	touch $@

bench-train: deps $(BENCH_VENV)/.installed
	$(PY) -m bench.train_throughput --peer_python=$(BENCH_VENV)/bin/python \
	  --out=bench/results/train_throughput.json

clean-demo:
	rm -rf runs/demo
