# Two commands do everything: `make reproduce` and `make test`.
# Each creates the virtual environment in .venv when it is missing (every extra, so the smp adapters and the
# notebooks are tested too), then runs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gmmseg-installed
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
PROFILE ?= cpu

.PHONY: env test lint pytest reproduce bench gpu-check gpu-notebooks fashion-data clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[notebooks,zoo,dev]"
	@touch $(STAMP)

# Real Fashion-MNIST IDX files from Debian, when apt is there and the files are not.
fashion-data:
	@if [ ! -e "$(FASHION_DIR)" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
			|| echo "could not install dataset-fashion-mnist; the fashion tests and notebook runs will skip it"; \
	elif [ ! -e "$(FASHION_DIR)" ] && [ -z "$$GMMSEG_DATA" ]; then \
		echo "no Fashion-MNIST files in $(FASHION_DIR) (install Debian's dataset-fashion-mnist as root, or put" \
			"the IDX files in \$$GMMSEG_DATA/fashion-mnist); the fashion tests and notebook runs will skip it"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check gmmseg_core tests benchmarks

pytest: $(STAMP) fashion-data
	$(PY) -m pytest -q

test: lint pytest

reproduce: $(STAMP) fashion-data
	$(VENV)/bin/gmmseg reproduce --profile $(PROFILE)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# A few minutes on a CUDA machine: device-vs-CPU agreement, a bf16 training run, the head and train-step benchmarks.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --device cuda

# About ten minutes on a CUDA machine: the six notebooks through papermill on the device (smoke, then gpu shortened).
gpu-notebooks: $(STAMP)
	$(PY) -m benchmarks.gpu_check --device cuda --only notebooks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
