# Developer tasks. `make test` builds .venv once (a stamp file records it), then runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# CPU build of torch from PyPI: pinning it first keeps pip from resolving a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv test run lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PIN)
	$(VENV)/bin/pip install -e '.[test]'
	touch $(STAMP)

test: venv
	$(VENV)/bin/pytest -q

run: venv
	$(VENV)/bin/gpt2serve serve --model random:gpt2

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
