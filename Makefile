# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

# Table 2 (noise schedules) at demo scale on the built-in emoji data, then the table and figures.
demo: $(STAMP)
	$(PY) -m experiments.run table=2 scale=demo workdir=$(DEMO_DIR)
	$(PY) -m tables.render table=2 workdir=$(DEMO_DIR) out=$(DEMO_DIR)/tables figures=true
	@echo "tables: $(DEMO_DIR)/tables/table_2.md  figures: $(DEMO_DIR)/tables/figures  tensorboard --logdir $(DEMO_DIR)"

test: $(STAMP)
	bash scripts/setup_latex.sh
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf runs out .pytest_cache
