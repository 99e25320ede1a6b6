# The two commands of the README:  `make serve`  and  `make test`.  Both set everything up first.
# `make serve` installs only what serving needs (stamp $(STAMP)); `make test` adds the test tools on top (stamp
# $(TEST_STAMP)), so `make test` after `make serve` installs just the test tools, and `make serve` after `make test`
# installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fsb-installed
TEST_STAMP := $(VENV)/.fsb-test-installed
TORCH   ?= torch==2.13.0
HOST    ?= 127.0.0.1
PORT    ?= 8000
LLAMA   ?= llama-cpp-python[server]>=0.3.16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
                    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup setup-test serve test browser bench clean

# Serving: the CPU build of torch (from the local wheel), then the package and its runtime dependencies only.
$(STAMP): pyproject.toml setup.py Makefile
	@echo "[setup] 1/3 creating $(VENV) (the install takes under 2 minutes on 2 cores; the model is converted at the first start)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "[setup] 2/3 installing $(TORCH) (CPU build)"
	$(BIN)/pip install --quiet "$(TORCH)"
	@echo "[setup] 3/3 installing Few-Shot Bot and its runtime dependencies"
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# Testing: the dev extra (pytest, openai, playwright, hypothesis, schemathesis) and llama-cpp-python's
# OpenAI-compatible server, for the remote-backend tests (a real server on loopback). PyPI has only its source: the
# first build takes several minutes on 2 cores; pip caches the wheel for later setups.
$(TEST_STAMP): $(STAMP)
	@echo "[setup-test] 1/2 installing the test tools (pytest, openai, playwright, hypothesis, schemathesis)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@echo "[setup-test] 2/2 building llama-cpp-python's server from source (once: 10-15 minutes on 2 cores; pip caches the wheel)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet "$(LLAMA)"
	touch $(TEST_STAMP)

setup: $(STAMP)

setup-test: $(TEST_STAMP)

# Debian's Chromium for the web-chat test (root on this kind of machine; skipped where it is already installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

serve: setup
	$(BIN)/python server.py --host $(HOST) --port $(PORT)

test: setup-test browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/lm.py

clean:
	rm -rf $(VENV) .pytest_cache
