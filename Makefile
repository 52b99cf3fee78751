# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
# JAX's build: cpu, cuda12 (NVIDIA GPUs) or tpu (Cloud TPU VMs), e.g. `make setup ACCEL=cuda12`.
# Unset: cpu, or the one the environment was set up for (docs/install.md).
ACCEL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Table 2's 128x128 group at 16x16 (gin/scales/demo.gin): its unshifted baseline and its best
# shift. The middle row (shifted to 64) would add ~5 minutes; any row runs with DEMO_ROWS=...
DEMO_ROWS ?= 128x128/cosine (original at 128),128x128/cosine (shifted to 32)
# The 16x16 emoji set the demo trains on (core.data.prepare.default_data_dir(16)).
DEMO_DATA ?= $(if $(SIMPLE_DIFFUSION_DATA),$(SIMPLE_DIFFUSION_DATA),$(CURDIR)/data)/emoji-16

.PHONY: setup demo test clean gpu-check gpu-wheels
$(STAMP): pyproject.toml scripts/setup.sh
	ACCEL=$(ACCEL) bash scripts/setup.sh $(VENV)

# Always runs (pip skips what is installed): `make setup ACCEL=...` switches an environment.
setup:
	ACCEL=$(ACCEL) bash scripts/setup.sh $(VENV)

$(DEMO_DATA)/meta.json: | $(STAMP)
	$(PY) -m core.data prepare src=emoji res=16 out=$(DEMO_DATA)

# Table 2's 128x128 rows at demo scale on the built-in emoji data (train, evaluate 500 samples
# each, keep them as .npz), then the table, the figures and whether the paper's ordering held.
# The rows train side by side (parallel=2: one process does not keep 2 cores busy, README) while
# Inception summarises the reference splits (cached once next to the data); then the rows are
# evaluated side by side too.
demo: $(STAMP) $(DEMO_DATA)/meta.json
	$(PY) -m eval.reference data_dir=$(DEMO_DATA) split=eval && \
	  $(PY) -m eval.reference data_dir=$(DEMO_DATA) split=train & ref=$$!; \
	  $(PY) -m experiments.run table=2 row="$(DEMO_ROWS)" scale=demo workdir=$(DEMO_DIR) eval=false \
	    parallel=2; \
	  trained=$$?; wait $$ref && test $$trained -eq 0
	$(PY) -m experiments.run table=2 row="$(DEMO_ROWS)" scale=demo workdir=$(DEMO_DIR) parallel=2
	$(PY) -m tables.render table=2 workdir=$(DEMO_DIR) out=$(DEMO_DIR)/tables figures=true
	$(PY) -m tables.ordering table=2 workdir=$(DEMO_DIR)
	@echo "table: $(DEMO_DIR)/tables/table_2.md  samples and numbers side by side:" \
	  "$(DEMO_DIR)/tables/figures/samples_table_2.png  tensorboard --logdir $(DEMO_DIR)"

test: $(STAMP)
	bash scripts/setup_latex.sh
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

clean:
	rm -rf runs out .pytest_cache

# The prepared one-GPU check (issue 15): on the GPU machine, with wheels/ carried along (no network
# there). Writes benchmarks/results/<device>-<date>.json. GPU_CHECK_SMOKE=1 runs it tiny on a CPU.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Here, where pip reaches PyPI: wheels of the project's dependencies that the GPU image lacks.
gpu-wheels: $(STAMP)
	$(PY) scripts/gpu_check_wheels.py out=wheels
