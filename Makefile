# Two entry points for a fresh machine (see README):
#   make serve  -> a torch-free serving venv, then the server on the shipped default bundle
#   make test   -> a full dev venv (CPU torch), then the test suite
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
BUNDLE ?= bundles/mnist-default
ARGS ?=

.PHONY: test serve venv lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[serve,train,dev]'
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(ARGS)

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m runtime serve $(BUNDLE) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(SERVE_VENV) build *.egg-info
