# specserve: two commands on a fresh machine.
#   make run    install, prepare the offline Qwen2.5-Coder pair, serve it (Ray Serve, local) and
#               answer a real request through the public gRPC API, then stop
#   make serve  the same server, staying up until Ctrl-C (`make chat` in another terminal)
#   make test   install, run the test suite (tiny random models, no downloads)
# Every target installs what it needs into $(VENV) first (CPU torch 2.13.0 before the rest).

VENV ?= .venv
PY := $(VENV)/bin/python
SPECSERVE := $(VENV)/bin/specserve
PROMPT ?= Write a Python function that checks whether a string is a palindrome.

.PHONY: install install-qwen test run serve chat tiny bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-qwen: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,qwen]'
	touch $@

install: $(VENV)/.installed

install-qwen: $(VENV)/.installed-qwen

test: install
	$(PY) -m pytest -q

run: install-qwen
	$(SPECSERVE) models prepare
	$(SPECSERVE) serve --ask "$(PROMPT)" --exit

serve: install-qwen
	$(SPECSERVE) models prepare
	$(SPECSERVE) serve

chat: install
	$(SPECSERVE) chat

tiny: install
	$(SPECSERVE) models tiny models/tiny

clean:
	rm -rf $(VENV) models .pytest_cache
