# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Table 2's 128x128 group (three noise schedules), trained at 16x16 (gin/scales/demo.gin).
DEMO_ROWS ?= 128x128/cosine (original at 128),128x128/cosine (shifted to 64),128x128/cosine (shifted to 32)

.PHONY: setup demo test clean
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

# Table 2's 128x128 rows at demo scale on the built-in emoji data (train, evaluate 500 samples
# each, keep them as .npz), then the table, the figures and whether the paper's ordering held.
demo: $(STAMP)
	$(PY) -m experiments.run table=2 row="$(DEMO_ROWS)" scale=demo workdir=$(DEMO_DIR)
	$(PY) -m tables.render table=2 workdir=$(DEMO_DIR) out=$(DEMO_DIR)/tables figures=true
	$(PY) -m tables.ordering table=2 workdir=$(DEMO_DIR)
	@echo "table: $(DEMO_DIR)/tables/table_2.md  samples and numbers side by side:" \
	  "$(DEMO_DIR)/tables/figures/samples_table_2.png  tensorboard --logdir $(DEMO_DIR)"

test: $(STAMP)
	bash scripts/setup_latex.sh
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf runs out .pytest_cache
