# make demo  -- set up a virtual environment and run the main job (train, fold, export, benchmark)
# make test  -- set up the same environment and run the test suite (every tier: what CI runs)
# make test-fast -- the quick loop while developing: the tests not marked slow or network
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo info bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3  # pinned: tests/test_detection_sources.py probes with `pip index`
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The suite runs in pytest-xdist workers, one per core (at most 4; tests/conftest.py gives each its
# share of the threads), tests handed out as workers free up. TEST_ARGS adds pytest options.
PARALLEL := -n auto --maxprocesses 4 --dist worksteal

test: setup
	$(PY) -m pytest -q $(PARALLEL) $(TEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q $(PARALLEL) -m "not slow and not network" $(TEST_ARGS)

demo: setup
	$(VENV)/bin/repghost demo

info: setup
	$(VENV)/bin/repghost info

clean:
	rm -rf $(VENV) .pytest_cache repghost-demo
