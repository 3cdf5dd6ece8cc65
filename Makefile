# axolotl-soka: `make demo` sets up and runs the offline demo; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV := .venv
VENV_PEFT21 := .venv-peft021
PIP_FLAGS ?= --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-core-peft021 lint format bench clean

# torch is pinned first so that pip takes the CPU build instead of downloading CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -q --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -q torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -q -c constraints.txt -e '.[dev]'
	touch $@

# A second environment runs the core tests on peft 0.21 (axolotl 0.19 pins peft 0.20).
$(VENV_PEFT21)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_PEFT21)
	$(VENV_PEFT21)/bin/pip install $(PIP_FLAGS) -q --upgrade pip
	$(VENV_PEFT21)/bin/pip install $(PIP_FLAGS) -q torch==2.13.0
	$(VENV_PEFT21)/bin/pip install $(PIP_FLAGS) -q -e '.[test]' peft==0.21.2 transformers==5.16.1
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python -m axolotl_soka.demo.run

# The two environments are installed side by side (about 5 min instead of 7 on a fresh 2-core machine).
test:
	$(MAKE) --no-print-directory -j2 $(VENV)/.installed $(VENV_PEFT21)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV_PEFT21)/bin/python -m pytest -q -p no:cacheprovider tests/core
	$(VENV)/bin/python -m pytest -q

test-core-peft021: $(VENV_PEFT21)/.installed
	$(VENV_PEFT21)/bin/python -m pytest -q tests/core

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) $(VENV_PEFT21) outputs .pytest_cache
