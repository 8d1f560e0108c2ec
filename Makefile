# Every install step lives here (or in pyproject.toml). Targets are idempotent: `make setup`
# is a no-op when pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch; an unpinned torch would pull several GB of CUDA wheels.
TORCH_CPU := torch==2.13.0
# The range pyproject.toml pins (the loss normaliser encodes DeepSpeed's gradient divisors).
DEEPSPEED := deepspeed>=0.19.8,<0.20

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
	$(BIN)/hadolint images/train/Dockerfile images/operator/Dockerfile
	$(BIN)/python -m pytest -q tests

# The main job on the embedded default: the quickstart pipeline on a local Ray instance with a
# tiny Llama (data prepared from a local corpus, no download): stage1 -> stage2 (SP=2) -> SFT ->
# HELMET's synthetic recall tasks. Outputs in runs/quickstart/; complete stages are skipped.
quickstart: setup
	$(BIN)/prolongctl validate jobs/quickstart/*.yaml
	$(BIN)/prolongctl plan jobs/quickstart/pipeline.yaml
	$(BIN)/prolongctl run jobs/quickstart/pipeline.yaml
	@echo "quickstart ran: stage1 -> stage2 (SP=2) -> sft -> eval of jobs/quickstart/pipeline.yaml; outputs in runs/quickstart/"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/data_loader.py

clean:
	rm -rf runs .pytest_cache
