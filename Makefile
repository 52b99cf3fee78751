# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean gpu-check gpu-wheels
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

# The prepared one-GPU check (issue 15): on the GPU machine, with wheels/ carried along (no network
# there). Writes benchmarks/results/<device>-<date>.json. GPU_CHECK_SMOKE=1 runs it tiny on a CPU.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Here, where pip reaches PyPI: wheels of the project's dependencies that the GPU image lacks.
gpu-wheels: $(STAMP)
	$(PY) scripts/gpu_check_wheels.py out=wheels
