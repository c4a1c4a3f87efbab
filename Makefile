# One line each for a fresh machine (see README.md).
#   make demo  - install, then train a LoRA on the embedded tiny world and show the result
#   make test  - install with test extras, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch that lies on this machine's disk; GPU users: see README ("GPU install").
TORCH ?= torch==2.13.0

.PHONY: install install-test demo test browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/adapt demo

# Debian's chromium drives the real-browser UI test (playwright cannot download a browser here).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "note: chromium not installed; the browser test will be skipped")

test: install-test browser-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build runs .pytest_cache
