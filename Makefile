# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.run table=2 scale=demo workdir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf runs out .pytest_cache
