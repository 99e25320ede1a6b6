# The two commands of the README:  `make serve`  and  `make test`.  Both set everything up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fsb-installed
TORCH   ?= torch==2.13.0
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: setup serve test browser bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the web-chat test (root on this kind of machine; skipped where it is already installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

serve: setup
	$(BIN)/python server.py --host $(HOST) --port $(PORT)

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/lm.py

clean:
	rm -rf $(VENV) .pytest_cache
