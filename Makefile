# axolotl-soka: `make demo` sets up and runs the offline demo; `make test` sets up and runs the tests.
#
# Two supported stacks, each in its own environment with its own constraints file:
#   .venv     Python 3.11, axolotl 0.19.0 (peft 0.20.0, transformers 5.16.1), CPU torch 2.13.0
#   .venv312  Python 3.12, axolotl 0.21.0 (peft 0.21.2, transformers 5.20.1), torch 2.14.1 from the registry
PYTHON ?= python3.11
# python3.12 on PATH, else the newest 3.12 that pyenv has (empty when neither: the 3.12 set-up says so)
ifndef PYTHON312
PYTHON312 := $(shell python3.12 -c '' 2>/dev/null && echo python3.12 || { \
	v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$$' | tail -1); \
	[ -n "$$v" ] && PYENV_VERSION=$$v pyenv which python3.12; })
endif
VENV := .venv
VENV312 := .venv312
PIP_FLAGS ?= --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# DeepSpeed compiles its CPU communication op (C++) on first use, 1-2 minutes: the tests build it first, so
# a test's time is the test's. The build is cached per Python version and torch variant under
# ~/.cache/torch_extensions (py311_cpu, py312_cu130).
PREBUILD_DS := from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)

.PHONY: setup setup312 demo test test311 test312 lint format bench clean bwrap

# torch is pinned first so that pip takes the CPU build instead of downloading CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints-py311.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -q --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -q torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -q -c constraints-py311.txt -e '.[dev]'
	touch $@

$(VENV312)/.installed: pyproject.toml constraints-py312.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it, or run make PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install $(PIP_FLAGS) -q --upgrade pip
	$(VENV312)/bin/pip install $(PIP_FLAGS) -q -c constraints-py312.txt -e '.[dev]'
	touch $@

%/.deepspeed-op: %/.installed
	DS_ACCELERATOR=cpu $*/bin/python -c "$(PREBUILD_DS)"
	touch $@

# The MBPP evaluation runs generated programs under bubblewrap (Debian's package), installed here when missing.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else \
	    echo "bubblewrap missing: install it (apt-get install bubblewrap, or your distribution's package)" >&2; \
	  fi; }

setup: $(VENV)/.installed

setup312: $(VENV312)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python -m axolotl_soka.demo.run

# The two environments are installed side by side; then the full suite runs on each stack, one after the other.
test: bwrap
	$(MAKE) --no-print-directory -j2 $(VENV)/.deepspeed-op $(VENV312)/.deepspeed-op
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory test311
	$(MAKE) --no-print-directory test312

test311: bwrap $(VENV)/.deepspeed-op
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test312: bwrap $(VENV312)/.deepspeed-op
	$(VENV312)/bin/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) $(VENV312) .venv-peft021 outputs .pytest_cache
