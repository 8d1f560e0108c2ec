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

.PHONY: setup test quickstart quickstart-base lint bench clean images

setup: $(STAMP)

# Every install takes the versions the tests last passed with (images/constraints.txt, which the
# images install too), so a fresh machine gets the tested environment, not the newest releases
# pyproject's ranges allow. The file is generated from this venv (images/constraints.py), so it is
# not its own input: `make lock` upgrades the venv to the newest versions within the ranges
# (without the constraints) and rewrites the file from it; run `make test`, commit both.
# A package the file does not name (a dependency just added) installs unconstrained until then.
CONSTRAINTS := images/constraints.txt

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel --constraint $(CONSTRAINTS)
	$(BIN)/python -m pip install -q --constraint $(CONSTRAINTS) $(TORCH_CPU)
	# DeepSpeed is an sdist: build it against the torch above, without build isolation
	# (an isolated build environment would fetch a CUDA torch). No ops are pre-built.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation --constraint $(CONSTRAINTS) "$(DEEPSPEED)"
	$(BIN)/python -m pip install -q --constraint $(CONSTRAINTS) -e '.[dev]'
	touch $@

# torch and DeepSpeed are named again so that the eager upgrade keeps the tested CPU torch and
# builds DeepSpeed against it (as above) instead of in an isolated environment.
.PHONY: lock
lock: setup
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager \
		--no-build-isolation $(TORCH_CPU) "$(DEEPSPEED)" -e '.[dev]'
	$(BIN)/python images/constraints.py > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	touch $(STAMP)

test: setup
	$(BIN)/python -c "import prolong.versions as v; print(v.summary())"
	$(BIN)/hadolint images/train/Dockerfile images/operator/Dockerfile
	# Two xdist workers; the tests that start Ray run one after another (tests/conftest.py groups
	# them), the rest spread over both. The bench scripts' end-to-end runs are make bench's.
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not bench and not chaos" --durations=15 tests

# The main job on the embedded default: the quickstart pipeline on a local Ray instance with a
# tiny Llama (data prepared from a local corpus, no download): stage1 -> stage2 (SP=2) -> SFT ->
# HELMET's synthetic recall tasks. Outputs in runs/quickstart/; complete stages are skipped.
quickstart: setup
	$(BIN)/prolongctl validate jobs/quickstart/*.yaml
	$(BIN)/prolongctl plan --summary jobs/quickstart/pipeline.yaml
	$(BIN)/prolongctl run jobs/quickstart/pipeline.yaml
	@echo "quickstart ran: stage1 -> stage2 (SP=2) -> sft -> eval of jobs/quickstart/pipeline.yaml; outputs in runs/quickstart/"

# Re-make the quickstart's pretrained base (jobs/quickstart/base/, what the quickstart's stage 1
# starts from, as ProLong's starts from Llama-3-8B-Instruct): run jobs/quickstart/base.yaml (about
# an hour on 2 busy cores; it resumes from its checkpoints when interrupted), then ship its final/
# (weights, tokenizer), manifest.json and curves.png into the repository. Commit the result.
quickstart-base: setup
	$(BIN)/prolongctl run jobs/quickstart/base.yaml
	$(BIN)/python -m prolong.run.ship jobs/quickstart/base.yaml jobs/quickstart/base
	# Whether the circuit formed: copy and needle-lookup accuracy on held-out documents.
	$(BIN)/python bench/base_probe.py jobs/quickstart/base/final

lint: setup
	$(BIN)/ruff check .

# Every benchmark this machine can run, then one table (GPU figures listed as not measured
# without CUDA). bench/RESULTS.md records the figures; bench/gpu_check.sh is the GPU check.
bench: setup
	$(BIN)/python bench/run_all.py
	# The bench scripts end to end (SP overhead on two ranks, gpu_check.sh --cpu-dry-run).
	$(BIN)/python -m pytest -q -m bench tests/bench
	# The chaos drills: 20 SIGKILLed workers in one stage, storage faults (tests marked chaos).
	$(BIN)/python -m pytest -q -s -m chaos tests

# Both images, tagged <REGISTRY>/prolong-train:<version> and <REGISTRY>/prolong-operator:<version>
# (the version is pyproject's, the chart's appVersion): nothing is published under a default
# name, so the chart and every job file name what this builds. Push them yourself
# (docker push ...), then helm install with operator.image.repository=<REGISTRY>/prolong-operator
# and set spec.cluster.image in the job files. DOCKER=podman works too.
DOCKER  ?= docker
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	@test -n "$(REGISTRY)" || { echo "make images REGISTRY=<registry>/<path>: where the images will be pushed" >&2; exit 2; }
	$(DOCKER) build -f images/train/Dockerfile -t $(REGISTRY)/prolong-train:$(VERSION) .
	$(DOCKER) build -f images/operator/Dockerfile -t $(REGISTRY)/prolong-operator:$(VERSION) .

clean:
	rm -rf runs .pytest_cache
