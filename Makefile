# Every install step lives here (or in pyproject.toml). Targets are idempotent: `make setup`
# is a no-op when pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch; an unpinned torch would pull several GB of CUDA wheels.
TORCH_CPU := torch==2.13.0
DEEPSPEED := deepspeed>=0.18.6

export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE = 1

.PHONY: setup test quickstart lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_CPU)
	# DeepSpeed is an sdist: build it against the torch above, without build isolation
	# (an isolated build environment would fetch a CUDA torch). No ops are pre-built.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -c "import prolong.versions as v; print(v.summary())"
	$(BIN)/python -m pytest -q tests

# The main job on the embedded default. Until the training engine lands this runs what exists and
# says so: validation and the plan of the quickstart pipeline.
quickstart: setup
	@echo "== prolongctl validate jobs/quickstart/*.yaml"
	$(BIN)/prolongctl validate jobs/quickstart/*.yaml
	@echo "== prolongctl plan jobs/quickstart/pipeline.yaml"
	$(BIN)/prolongctl plan jobs/quickstart/pipeline.yaml
	@echo "quickstart ran: validate + plan of jobs/quickstart/pipeline.yaml (training: see README, Status)"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/data_loader.py

clean:
	rm -rf runs .pytest_cache
